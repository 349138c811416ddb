"""Bad input fails at entry with a ValueError that names the problem; METHODS is complete."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landscape import merge

A = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
B = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(2)}}
C = {"dense": {"kernel": jnp.ones((3, 2)), "other": jnp.zeros(2)}}
BASE = {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
KEY = jax.random.key(0)


@pytest.mark.parametrize(
    "call",
    [
        lambda: merge.average([A, B]),
        lambda: merge.ties([A, B], base=BASE),
        lambda: merge.task_arithmetic([A, A], base=B),
        lambda: merge.slerp(A, B, t=0.5),
        lambda: merge.dare(KEY, [A, B], base=BASE),
        lambda: merge.model_stock([A, B], base=BASE),
        lambda: merge.fisher_average([A, A], [A, B]),
    ],
)
def test_mismatched_trees_name_the_path(call):
    with pytest.raises(ValueError, match="dense/kernel"):
        call()


def test_mismatched_keys_name_the_leaf():
    with pytest.raises(ValueError, match="dense/bias|dense/other"):
        merge.average([A, C])


@pytest.mark.parametrize(
    "call",
    [
        lambda: merge.average([]),
        lambda: merge.ties([], base=BASE),
        lambda: merge.swa([]),
        lambda: merge.regmean([], []),
    ],
)
def test_empty_model_list(call):
    with pytest.raises(ValueError, match="empty"):
        call()


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_outside_unit_interval(density):
    with pytest.raises(ValueError, match=r"density must lie in \(0.0, 1.0\]"):
        merge.ties([A, A], base=BASE, density=density)
    with pytest.raises(ValueError, match="density"):
        merge.breadcrumbs([A, A], base=BASE, density=density)
    with pytest.raises(ValueError, match="density"):
        merge.sparsify.topk_mask(A, density=density)


def test_other_ranges():
    with pytest.raises(ValueError, match="drop"):
        merge.dare(KEY, [A, A], base=BASE, drop=1.0)
    with pytest.raises(ValueError, match="gamma"):
        merge.breadcrumbs([A, A], base=BASE, gamma=1.0)
    with pytest.raises(ValueError, match="epsilon"):
        merge.della(KEY, [A, A], base=BASE, density=0.1, epsilon=0.15)
    with pytest.raises(ValueError, match="alpha"):
        merge.regmean([A, A], [{"dense/kernel": jnp.eye(3)}] * 2, alpha=1.5)
    with pytest.raises(ValueError, match="at least 2"):
        merge.model_stock([A], base=BASE)


@pytest.mark.parametrize(
    "call",
    [
        lambda: merge.average([A, A], weights=[1.0, 2.0, 3.0]),
        lambda: merge.task_arithmetic([A, A], base=BASE, weights=[1.0]),
        lambda: merge.ties([A, A, A], base=BASE, weights=np.ones((3, 1))),
        lambda: merge.fisher_average([A, A], [A, A], weights=[1.0]),
        lambda: merge.mats([A, A], [A, A], weights=[1.0, 1.0, 1.0]),
    ],
)
def test_weights_of_wrong_length(call):
    with pytest.raises(ValueError, match="one entry per model"):
        call()


def test_negative_weights_need_no_normalisation():
    with pytest.raises(ValueError, match="normalize=False"):
        merge.average([A, A], weights=[1.0, -1.0])
    merge.average([A, A], weights=[1.0, -1.0], normalize=False)


def test_methods_needing_a_key():
    with pytest.raises(ValueError, match="PRNG key"):
        merge.dare(None, [A, A], base=BASE)
    with pytest.raises(ValueError, match="PRNG key"):
        merge.della(None, [A, A], base=BASE)


def test_unknown_options_list_accepted_values():
    with pytest.raises(ValueError, match=r"\['leaf', 'global', 'row'\]"):
        merge.ties([A, A], base=BASE, scope="model")
    with pytest.raises(ValueError, match="inverse"):
        merge.dare(KEY, [A, A], base=BASE, rescale="l2")
    with pytest.raises(ValueError, match="cosine"):
        merge.model_stock([A, A], base=BASE, angle="sine")


def test_statistics_mismatch():
    with pytest.raises(ValueError, match="2 models but 1"):
        merge.regmean([A, A], [{"dense/kernel": jnp.eye(3)}])
    with pytest.raises(ValueError, match="not a leaf"):
        merge.regmean([A, A], [{"dense/w": jnp.eye(3)}] * 2)
    with pytest.raises(ValueError, match="input dimension"):
        merge.regmean([A, A], [{"dense/kernel": jnp.eye(4)}] * 2)
    with pytest.raises(ValueError, match="2 models but 3"):
        merge.fisher_average([A, A], [A, A, A])
    bad = {"dense": {"kernel": merge.KroneckerFactors(a=jnp.eye(2), g=jnp.eye(2)), "bias": jnp.ones(2)}}
    with pytest.raises(ValueError, match="dense/kernel"):
        merge.mats([A, A], [bad, bad])
    with pytest.raises(ValueError, match="mask"):
        merge.dare(None, [A, A], base=BASE, mask=[jax.tree.map(lambda x: x > 0, A)])


def test_methods_catalogue():
    names = set(merge.METHODS)
    assert {"average", "swa", "greedy_soup", "model_stock", "slerp", "task_arithmetic", "ties", "dare",
            "breadcrumbs", "della", "fisher", "regmean", "mats", "adamerging"} <= names
    for name, method in merge.METHODS.items():
        assert method.name == name and callable(method)
        assert method.arxiv is None or (len(method.arxiv) == 10 and method.arxiv[4] == ".")
        assert method.paper and method.variant
        assert method.fn.__doc__ and (method.arxiv is None or method.arxiv in inspect.getdoc(method.fn) or
                                      method.arxiv in inspect.getmodule(method.fn).__doc__)
        d = method.to_dict()
        assert d["name"] == name and isinstance(d["needs"], list)
        if "key" in method.needs:
            assert next(iter(inspect.signature(method.fn).parameters)) == "key"
    out = merge.METHODS["dare_ties"](KEY, [A, A], base=BASE, drop=0.5)
    ref = merge.dare(KEY, [A, A], base=BASE, drop=0.5, combine="ties")
    np.testing.assert_array_equal(out["dense"]["kernel"], ref["dense"]["kernel"])
