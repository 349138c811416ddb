"""StreamingObjective: batches from memory-mapped .npy files or a Python iterable, exact averages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landscape import Objective
from landscape.objective import IGNORE_INDEX, StreamingObjective, npy_batches
from probes import hessian


def mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.fixture(scope="module")
def setup():
    k = jax.random.split(jax.random.key(0), 5)
    x = np.asarray(jax.random.normal(k[0], (203, 5)))  # 6 batches of 32 and a last one of 11
    y = np.asarray(jax.random.randint(k[1], (203,), 0, 3))
    p = {"w1": jax.random.normal(k[2], (5, 6)), "b1": 0.1 * jax.random.normal(k[3], (6,)),
         "w2": jax.random.normal(k[4], (6, 3))}
    return x, y, p


def test_memmap_npy_stream_equals_in_memory(setup, tmp_path):
    x, y, p = setup
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    source = npy_batches(str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), batch_size=32)
    first = next(iter(source()))
    assert first[0].shape == (32, 5) and np.array_equal(first[0], x[:32])
    stream = StreamingObjective(mlp, source)
    memory = Objective(mlp, jnp.asarray(x), jnp.asarray(y), batch_size=50)
    assert stream.num_examples() == 203
    for k, v in stream.evaluate(p).items():
        assert _rel(v, memory.evaluate(p)[k]) < 1e-6, k
    for a, b in zip(jax.tree.leaves(stream.grad(p)), jax.tree.leaves(jax.grad(memory.loss)(p))):
        assert _rel(a, b) < 1e-6
    v = jax.tree.map(jnp.cos, p)
    for a, b in zip(jax.tree.leaves(stream.hvp(p, v)), jax.tree.leaves(hessian.hvp(memory, p, v))):
        assert _rel(a, b) < 1e-5


def test_iterable_token_stream_equals_in_memory():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 6, (23, 4)).astype(np.int32)
    mask = (np.arange(4)[None] < rng.integers(1, 5, 23)[:, None]).astype(np.int32)
    y = np.concatenate([ids[:, 1:], np.full((23, 1), IGNORE_INDEX)], axis=1).astype(np.int32)
    e = jax.random.normal(jax.random.key(3), (6, 6))

    def apply_fn(q, x):
        return jnp.cumsum(q[x["input_ids"]] * x["attention_mask"][..., None], axis=1)

    def source():  # a plain generator of dict batches of 5, the last one of 3
        for s in range(0, 23, 5):
            yield {"input_ids": ids[s:s + 5], "attention_mask": mask[s:s + 5]}, y[s:s + 5]

    stream = StreamingObjective(apply_fn, source, loss="next_token")
    memory = Objective(apply_fn, {"input_ids": ids, "attention_mask": mask}, y, loss="next_token", batch_size=7)
    for k, v in stream.evaluate(e).items():
        assert _rel(v, memory.evaluate(e)[k]) < 1e-6, k
    assert _rel(stream.grad(e), jax.grad(memory.loss)(e)) < 1e-6


def test_bad_streams(setup, tmp_path):
    x, y, p = setup

    def changing():
        yield x[:8], y[:8]
        yield x[:8, :4], y[:8]

    with pytest.raises(ValueError, match=r"batch 1 has shapes .*\(8, 4\).* but batch 0 had .*\(8, 5\)"):
        StreamingObjective(mlp, changing).loss(p)

    def short_in_middle():
        yield x[:8], y[:8]
        yield x[8:12], y[8:12]
        yield x[12:20], y[12:20]

    with pytest.raises(ValueError, match="batch 1 held 4 examples.*batch 2 follows"):
        StreamingObjective(mlp, short_in_middle).loss(p)

    def bad_label():
        yield x[:8], np.full(8, 3)

    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        StreamingObjective(mlp, bad_label).loss(p)
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        npy_batches(str(tmp_path / "nope.npy"), str(tmp_path / "nope.npy"), batch_size=4)
