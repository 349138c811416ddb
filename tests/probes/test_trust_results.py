"""No silent wrong answers in probe results: barriers, spreads over seeds, strict JSON, the cache.

Each test pins one class of fault of issue 12 that used to return a plausible number.
"""

import json
import math
import warnings

import jax
import numpy as np
import pytest

from landscape import io, tree
from landscape.train import DivergenceError
from probes import report
from probes.characteristics import ConnectivityResult, ConnectivitySample, ConvexityResult, ConvexitySample
from probes.characteristics import DeterminismResult
from probes.characteristics._directedness import _ms
from probes.config import parse_config
from probes.curves import PathResult
from probes.numerics import json_safe, spread

NAN = float("nan")


def strict_loads(text):
    """json.loads that refuses NaN / Infinity (the JSON standard has neither)."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------ barriers
def _path(loss, acc=None):
    ts = np.linspace(0.0, 1.0, len(loss))
    acc = np.full(len(loss), 0.9) if acc is None else np.asarray(acc, float)
    return PathResult(ts=ts, loss=np.asarray(loss, float), accuracy=acc)


def test_nan_inside_a_path_makes_the_barrier_nan_and_flagged():
    r = _path([0.1, 0.2, NAN, 0.3, 0.1])  # nanargmax used to skip the NaN: barrier 0.2 "fine"
    b = r.barrier
    assert math.isnan(b.loss) and math.isnan(b.t_loss) and not b.finite and not r.finite
    assert b.error == pytest.approx(0.0) and b.t_error == 0.0  # the error curve itself is finite
    ok = _path([0.1, 0.2, 0.4, 0.3, 0.1]).barrier
    assert ok.finite and ok.loss == pytest.approx(0.4 - 0.1) and ok.t_loss == 0.5


def test_nan_at_an_endpoint_propagates_without_numpy_warnings():
    r = _path([NAN, 0.2, 0.3], acc=[NAN, 0.5, 0.5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "All-NaN slice encountered" used to raise here
        bars = [r.barrier_for(d) for d in ("linear", "mean")]
        d = r.to_dict()
    assert all(math.isnan(b.loss) and math.isnan(b.error) and not b.finite for b in bars)
    back = strict_loads(json.dumps(d, allow_nan=False))
    assert back["finite"] is False and back["loss"][0] is None
    assert back["barrier"]["linear"] == {"loss": None, "error": None, "t_loss": None, "t_error": None,
                                         "definition": "linear", "finite": False}


def test_plot_marks_non_finite_points():
    fig = _path([0.1, NAN, 0.1]).plot()
    marked = [t for t in fig.data if t.name and t.name.endswith("non-finite")]
    assert marked and list(marked[0].x) == [0.5]
    assert any("NON-FINITE" in a.text for a in fig.layout.annotations)


# ------------------------------------------------------------------ spreads over seeds
def test_spread_definition():
    s = spread([0.1, NAN, 0.3])  # the example: 0.141 in one helper, 0.100 in another
    assert s.mean == pytest.approx(0.2) and s.std == pytest.approx(math.sqrt(0.02))  # ddof=1 by hand
    assert (s.n, s.n_nonfinite, s.finite) == (2, 1, False)
    one = spread([0.5, None])
    assert one.mean == 0.5 and math.isnan(one.std) and one.n_nonfinite == 1  # std of one sample: undefined
    cols = spread(np.array([[1.0, 2.0], [3.0, NAN], [5.0, 4.0]]), axis=0)
    np.testing.assert_allclose(cols.mean, [3.0, 3.0])
    np.testing.assert_allclose(cols.std, [2.0, math.sqrt(2.0)])
    np.testing.assert_array_equal(cols.n_nonfinite, [0, 1])


def _barrier_path(height):
    return _path([0.0, height, 0.0], acc=[1.0, 1.0, 1.0])


def test_every_characteristic_uses_the_one_spread():
    heights = [0.1, NAN, 0.3]
    want = spread(heights).to_dict()
    # connectivity: spread over pairs
    samples = tuple(
        ConnectivitySample(paths={"naive": {"train": _barrier_path(h)}}, wm_objective={"matched": 1.0},
                           wm_sweeps=1, singular=None, seconds={"total": 1.0})
        for h in heights
    )
    conn = ConnectivityResult(samples).to_dict()
    assert conn["table"]["naive"]["train"]["loss_barrier"] == want
    # convexity: spread over seeds of a per-basin metric
    def basin(h):
        return ConvexitySample(
            chord_pairs=np.zeros((1, 2), int), chord_end_loss=np.zeros((1, 2)), chord_mid_loss=np.zeros(1), tol=0.0,
            barrier_pairs=np.zeros((1, 2), int), barrier_loss=np.array([h]), barrier_error=np.array([0.0]),
            metrics={"barrier_loss": h, "chord_fraction": 1.0},
        )

    conv = ConvexityResult(tuple(basin(h) for h in heights), settings={})
    assert conv.summary["barrier_loss"] == want
    # determinism: spread over seeds per spawn step
    col = np.array(heights)[:, None]
    det = DeterminismResult(
        spawn_steps=(0,), steps=2, barrier_loss=col, barrier_error=col, child_distance=np.ones((3, 1)),
        child_loss=np.zeros((3, 1, 2)), child_accuracy=np.ones((3, 1, 2)), independent_distance=np.ones(3),
        independent_barrier_loss=np.zeros(3), independent_barrier_error=np.zeros(3), threshold=0.5,
        measure="loss", definition="linear", share_data_order=False,
    )
    dd = det.to_dict()
    assert dd["barrier_loss"]["mean"] == [pytest.approx(0.2)] and dd["barrier_loss"]["std"] == [pytest.approx(want["std"])]
    assert dd["barrier_loss"]["n_nonfinite"] == [1] and dd["finite"] is False
    # a spawn step with a NaN barrier is never "stable" (mean NaN > threshold used to be False)
    assert det.onset is None
    # directedness: the same numbers over the seed axis
    ms = _ms(np.array(heights))
    assert {k: ms[k] for k in ("mean", "std", "n", "n_nonfinite")} == {k: want[k] for k in ("mean", "std", "n", "n_nonfinite")}
    for d in (conn, conv.to_dict(), dd, ms):
        strict_loads(json.dumps(d, allow_nan=False))


def test_json_safe_converts_every_non_finite_value():
    raw = {"a": NAN, "b": [1.0, float("inf")], "c": np.array([np.nan, 2.0]), "d": np.float32("-inf"), "e": (np.int64(3),)}
    assert json_safe(raw) == {"a": None, "b": [1.0, None], "c": [None, 2.0], "d": None, "e": [3]}


# ------------------------------------------------------------------ the report
TINY = {"seed": 0, "num_models": 2, "model": {"name": "mlp", "widths": [8]}, "train": {"epochs": 1},
        "interpolation": {"num": 3},
        "sections": {k: "off" for k in ("connectivity", "surfaces", "curvature", "convexity", "determinism",
                                         "directedness")}}


def _nan_section(ctx):
    return report.Section("nan_probe", "NaN probe", "<p>nan</p>",
                          {"value": NAN, "curve": np.array([1.0, np.inf]), "nested": {"x": [NAN]}})


def test_results_json_is_strict_json_and_the_cache_refuses_nan(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "SECTIONS", (*report.SECTIONS[:1], ("nan_probe", _nan_section)))
    config = parse_config(TINY)
    results = report.run_report(config, tmp_path, log=lambda _m: None)
    stored = strict_loads((tmp_path / "results.json").read_text())  # bare NaN used to be written here
    assert stored["sections"]["nan_probe"] == {"value": None, "curve": [1.0, None], "nested": {"x": [None]}}
    assert results["sections"]["nan_probe"]["value"] is None
    # poison one cached checkpoint: the rerun must refuse it, naming the file, not load it
    path = sorted((tmp_path / "checkpoints").glob("*.safetensors"))[0]
    stored_params, meta = io.load(path)
    first = tree.named_leaves(stored_params)[0][0]
    poisoned = jax.tree_util.tree_map_with_path(
        lambda p, x: x * np.nan if tree.key_name(p) == first else x, stored_params
    )
    io.save(path, poisoned, metadata=meta)
    with pytest.raises(ValueError, match=rf"cached checkpoint .*{path.name}.* non-finite values"):
        report.run_report(config, tmp_path, log=lambda _m: None)


def test_a_diverging_member_is_never_cached(tmp_path):
    cfg = {**TINY, "train": {"epochs": 1, "optimizer": "sgd", "momentum": 0.0, "learning_rate": 1e30}}
    with pytest.raises(DivergenceError, match=r"training diverged at global step \d+ \(epoch 0"):
        report.run_report(parse_config(cfg), tmp_path, log=lambda _m: None)
    assert not list((tmp_path / "checkpoints").glob("*.safetensors"))


def test_convexity_chord_with_nan_loss_is_nan_not_a_failed_chord():
    import jax.numpy as jnp

    from landscape import Objective
    from probes.characteristics import convexity

    def apply_fn(p, x):  # loss |p|^2, NaN near the origin (the midpoint of the two members)
        v = jnp.sum(p**2)
        return jnp.zeros((x.shape[0], 1)) + jnp.where(v < 0.5, jnp.nan, v)

    obj = Objective(apply_fn, jnp.zeros((2, 1)), jnp.zeros((2, 1)), loss=lambda z, y: z[:, 0])
    res = convexity(jax.random.key(0), obj, [jnp.ones(2), -jnp.ones(2)], curvature=False, num_chords=4,
                    endpoints="members")
    m = res.samples[0].metrics
    assert math.isnan(m["chord_fraction"]) and math.isnan(res.chord_fraction)  # used to be 0.0: "not convex"
    assert math.isnan(m["barrier_loss"]) and res.summary["chord_fraction"]["n_nonfinite"] == 1
    strict_loads(json.dumps(res.to_dict(), allow_nan=False))
