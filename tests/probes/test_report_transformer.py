"""``landscape report`` on a transformer and a token dataset (issue 13 part 6).

One tiny GPT report runs end to end (module-scoped, one compilation per setting); the assertions check
it against independent recomputations: the interpolation endpoints are the members' own next-token
losses, the top Hessian eigenvalues are positive with small Lanczos residuals and bounded by the
Rayleigh quotients of HVPs recomputed here, unsupported sections are visible notes, and config errors
name the model and the data.
"""

import json
import math

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from landscape import Objective, data, io, models
from probes.config import ConfigError, parse_config
from probes.report import is_token_dataset, run_report

FILES = ["colorsys.py", "bisect.py"]
RAW = {
    "seed": 0,
    "data": {"name": "stdlib_text", "context": 16, "files": FILES},
    "model": {"name": "gpt", "width": 16, "depth": 1, "heads": 2},
    "train": {"epochs": 2, "batch_size": 32, "learning_rate": 3e-3},
    "interpolation": {"num": 5},
    "sections": {"surfaces": "off"},
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt_report")
    results = run_report(parse_config(RAW, source="gpt.toml"), out, log=lambda _: None)
    return out, results


def _member(out, results, i):
    """Member ``i``'s params from its checkpoint and the train Objective, rebuilt independently."""
    ds = data.stdlib_text(context=16, files=FILES)
    model = models.build("gpt", jax.random.key(i), vocab_size=256, context=16, width=16, depth=1, heads=2)
    apply_fn, params, state = models.functional(model)
    entry = results["sections"]["models"]["members"][i]
    stored, _ = io.load(out / entry["checkpoint"], like={"params": params, "state": state})
    return ds, apply_fn, stored["params"]


def test_results_strict_json_and_notes(report):
    out, results = report
    text = (out / "results.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}")) == results
    assert results["loss"] == "next_token"
    assert results["dataset"]["name"] == "stdlib_text" and results["dataset"]["files"] == FILES
    secs = results["sections"]
    assert {"models", "interpolation", "connectivity", "curvature"} <= set(secs)
    for name in ("convexity", "determinism", "directedness"):  # not run on tokens: a visible note, not a gap
        assert secs[name]["skipped"] is True and secs[name]["note"]
    assert "surfaces" not in secs  # switched off by the config
    noted = {(n["section"], n.get("method")) for n in results["notes"]}
    assert {("convexity", None), ("directedness", None), ("connectivity", "repair")} <= noted
    page = (out / "index.html").read_text()
    assert page.count("Not run on token data") == 3 and "repair skipped" in page


def test_interpolation_endpoints_are_member_losses(report):
    out, results = report
    ds, apply_fn, p0 = _member(out, results, 0)
    _, _, p1 = _member(out, results, 1)
    obj = Objective(apply_fn, *ds.train, loss="next_token")
    # hand-written token average: mean over real targets of -log softmax
    for params, end in ((p0, 0), (p1, -1)):
        logits = apply_fn(params, ds.x_train)
        y = np.asarray(ds.y_train)
        real = y != -100
        logp = jax.nn.log_softmax(logits, -1)
        picked = jnp.take_along_axis(logp, jnp.asarray(np.where(real, y, 0))[..., None], -1)[..., 0]
        ref = float(-(picked * real).sum() / real.sum())
        path = results["sections"]["interpolation"]["train"]
        assert path["loss"][end] == pytest.approx(ref, rel=1e-5)
        assert path["loss"][end] == pytest.approx(float(obj.evaluate(params)["loss"]), rel=1e-5)
        member = results["sections"]["models"]["members"][end]
        assert member["train"]["loss"] == pytest.approx(ref, rel=1e-5)


def test_connectivity_methods_on_transformer(report):
    _, results = report
    con = results["sections"]["connectivity"]
    assert set(con["skipped_methods"]) == {"repair"}
    text = json.dumps(con)
    for method in ("naive", "weight_matching", "activation_matching", "bezier"):
        assert method in text
    assert math.isfinite(con["wm_objective"]["mean"])


def test_curvature_top_eigenvalues_positive(report):
    out, results = report
    ds, apply_fn, p0 = _member(out, results, 0)
    entry = results["sections"]["curvature"]["models"][0]
    eig = np.asarray(entry["eigenvalues"]["eigenvalues"], dtype=float)
    assert eig.size == 3 and np.all(eig > 0)
    res = np.asarray(entry["eigenvalues"]["residuals"], dtype=float)
    assert res[np.argmax(eig)] < 1e-2 * eig.max()
    # independent check: λ_max bounds every Rayleigh quotient of exact HVPs of the token-averaged loss
    obj = Objective(apply_fn, *ds.train, loss="next_token")
    flat, unravel = jax.flatten_util.ravel_pytree(p0)
    hvp = jax.jit(lambda v, u: jax.jvp(jax.grad(lambda w: obj.loss(unravel(w))), (v,), (u,))[1])
    grad = jax.grad(lambda w: obj.loss(unravel(w)))(flat)
    for u in (grad, jax.random.normal(jax.random.key(0), flat.shape)):
        rayleigh = float(u @ hvp(flat, u) / (u @ u))
        assert rayleigh <= eig.max() * (1 + 1e-4)


def test_token_detection_and_config_errors(tmp_path):
    assert is_token_dataset(data.stdlib_text(context=8, files=["colorsys.py"]))
    assert not is_token_dataset(data.load("digits"))
    bad = {**RAW, "data": {"name": "digits"}}
    with pytest.raises(ConfigError, match=r"model 'gpt' needs a token dataset.*'digits'"):
        run_report(parse_config(bad, source="bad.toml"), tmp_path / "a", log=lambda _: None)
    bad = {**RAW, "model": {"name": "mlp"}}
    with pytest.raises(ConfigError, match=r"model 'mlp' does not read token ids.*'stdlib_text'"):
        run_report(parse_config(bad, source="bad.toml"), tmp_path / "b", log=lambda _: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(ConfigError, match=r"model\.vocab_size"):  # filled from the data, never set
        parse_config({**RAW, "model": {**RAW["model"], "vocab_size": 300}}, source="bad.toml")


def test_documented_transformer_config_parses():
    import re
    import tomllib
    from pathlib import Path

    page = (Path(__file__).parents[2] / "docs" / "config.md").read_text(encoding="utf-8")
    section = page[page.index("## A transformer on a token dataset"):]
    block = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    cfg = parse_config(tomllib.loads(block), source="docs/config.md")
    assert (cfg.model.name, cfg.data.name) == ("gpt", "stdlib_text")
    assert cfg.model.options == {"width": 64, "depth": 2, "heads": 4, "positions": "learned"}
