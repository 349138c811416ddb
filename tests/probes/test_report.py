"""The report end to end on a tiny config: files, schema, cache reuse, errors before work."""

import json
import re

import pytest

from probes.cli import main
from probes.config import parse_config
from probes.report import SCHEMA_VERSION, run_report

TINY = {"seed": 0, "model": {"name": "mlp", "widths": [16]}, "train": {"epochs": 2}, "interpolation": {"num": 5}}
OFF = {k: "off" for k in ("connectivity", "surfaces", "curvature", "convexity", "determinism", "directedness")}


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    logs = []
    results = run_report(parse_config(TINY), out, log=logs.append)
    return out, results, logs


def test_writes_self_contained_html_and_versioned_json(tiny_report):
    out, results, _ = tiny_report
    page = (out / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "Plotly.newPlot" in page
    assert not re.findall(r"<script[^>]*\bsrc=", page)  # plotly.js is inlined: opens offline
    for title in ("Linear interpolation", "Connectivity", "Loss surfaces", "Curvature", "Mode convexity",
                  "Mode determinism", "Directedness and merging"):
        assert title in page
    stored = json.loads((out / "results.json").read_text())
    assert stored["schema_version"] == SCHEMA_VERSION
    assert stored["config"]["train"]["epochs"] == 2
    members = stored["sections"]["models"]["members"]
    assert [m["init_seed"] for m in members] == [0, 1] and members[0]["data_seed"] != members[1]["data_seed"]
    interp = stored["sections"]["interpolation"]
    for split in ("train", "test"):
        assert len(interp[split]["ts"]) == 5
        assert interp[split]["barrier"]["linear"]["loss"] >= 0
        # the endpoints of the path are the trained models
        assert interp[split]["accuracy"][0] == pytest.approx(members[0][split]["accuracy"], abs=1e-6)
        assert interp[split]["accuracy"][-1] == pytest.approx(members[1][split]["accuracy"], abs=1e-6)
    assert set(stored["timings"]) >= {"train", "models", "interpolation", "connectivity", "surfaces", "curvature",
                                      "convexity", "determinism", "directedness", "total"}
    sections = stored["sections"]
    naive = sections["connectivity"]["table"]["naive"]["train"]["loss_barrier"]["mean"]
    assert naive == pytest.approx(interp["train"]["barrier"]["linear"]["loss"], rel=1e-4, abs=1e-6)
    assert len(sections["surfaces"]["random_plane"]["loss"]) == 15
    assert sections["curvature"]["models"][0]["eigenvalues"]["eigenvalues"][0] > 0
    assert 0 <= sections["convexity"]["summary"]["chord_fraction"]["mean"] <= 1
    assert sections["determinism"]["spawn_steps"][0] == 0
    cos = sections["directedness"]["cosine"]
    assert all(c[i] == pytest.approx(1.0, abs=1e-5) for i, c in enumerate(cos))


def test_sections_can_be_switched_off(tmp_path):
    cfg = {**TINY, "sections": OFF}
    results = run_report(parse_config(cfg), tmp_path, log=lambda _m: None)
    assert set(results["sections"]) == {"models", "interpolation"}


def test_rerun_loads_checkpoints(tiny_report):
    out, first, _ = tiny_report
    logs = []
    again = run_report(parse_config({**TINY, "sections": OFF}), out, log=logs.append)  # same digest: cached
    assert all(m["cached"] for m in again["sections"]["models"]["members"])
    assert sum("loaded" in line for line in logs) == 2
    assert again["sections"]["interpolation"]["test"]["loss"] == first["sections"]["interpolation"]["test"]["loss"]
    assert len(list((out / "checkpoints").glob("*.safetensors"))) == 2


def test_cli_errors_before_any_work(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[train]\nepochs = 2\nlr = 0.1\n")
    out = tmp_path / "out"
    assert main(["report", str(cfg), "--out", str(out), "--quiet"]) == 2
    assert "train.lr: unknown key" in capsys.readouterr().err
    assert not out.exists()
    cfg.write_text("[model]\nname = 'transformer'\n")
    assert main(["report", str(cfg), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "transformer" in err and "mlp" in err
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


FRESH_PROCESS = """
import json, sys
from probes.config import parse_config
from probes.report import run_report
cfg = json.loads(sys.argv[1])
run_report(parse_config(cfg), sys.argv[2], log=lambda _m: None)
"""

NUMBERS_OFF = {**OFF, "curvature": "quick"}


def _numbers(results, sections):
    """The measured numbers of ``sections``: everything but timings, dates and cache flags."""
    out = {}
    for name in sections:
        sec = json.loads(json.dumps(results["sections"][name], default=float))
        if name == "models":
            for m in sec["members"]:
                for k in ("cached", "path", "train_seconds"):
                    m.pop(k, None)
        out[name] = sec
    return out


def test_a_fresh_process_gives_identical_numbers(tiny_report, tmp_path):
    """Same config and seeds, a new Python process and an empty output folder: the trained models, the
    interpolation and the curvature section (its own Lanczos / Hutchinson / SLQ keys) are bit-identical."""
    import subprocess
    import sys

    out, first, _ = tiny_report
    cfg = {**TINY, "sections": NUMBERS_OFF}
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, json.dumps(cfg), str(tmp_path / "fresh")], check=True)
    again = json.loads((tmp_path / "fresh" / "results.json").read_text())
    stored = first  # results.json in ``out`` is rewritten by later tests; the fixture keeps the first run's
    assert not any(m["cached"] for m in again["sections"]["models"]["members"])
    keep = ("models", "interpolation", "curvature")
    assert _numbers(again, keep) == _numbers(stored, keep)
    # and the checkpoints hold bit-identical tensors (their metadata records the training time, which differs)
    from safetensors.numpy import load_file

    names = sorted(p.name for p in (tmp_path / "fresh" / "checkpoints").glob("*.safetensors"))
    assert len(names) == 2
    for name in names:
        a, b = load_file(out / "checkpoints" / name), load_file(tmp_path / "fresh" / "checkpoints" / name)
        assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_report_numbers_equal_the_direct_probes(tiny_report):
    """Reload the report's checkpoints and call the probes directly, with the keys the report documents
    (``fold_in(key(seed), section index)``): the barrier and the top eigenvalues are the same numbers."""
    import jax
    import numpy as np

    from landscape import Objective, io, models
    from landscape.data import load
    from probes import hessian
    from probes.curves import interpolate
    from probes.report import SECTION_IDS

    out, stored, _ = tiny_report
    cfg = parse_config(TINY)
    ds = load(cfg.data.name, **cfg.data.options)
    xt, yt = ds.train
    fm, params, state = models.functional(
        models.build("mlp", jax.random.key(0), in_features=int(np.prod(ds.input_shape)), widths=(16, ds.num_classes)))
    members = stored["sections"]["models"]["members"]
    loaded = [io.load(out / m["checkpoint"], like={"params": params, "state": state})[0]["params"] for m in members]
    train = Objective(fm, xt, yt, batch_size=512)
    direct = interpolate(train, loaded[0], loaded[1], num=5)
    interp = stored["sections"]["interpolation"]["train"]
    np.testing.assert_allclose(direct.loss, interp["loss"], rtol=1e-6, atol=1e-7)
    assert direct.barrier.loss == pytest.approx(interp["barrier"]["linear"]["loss"], rel=1e-6, abs=1e-7)
    key = jax.random.fold_in(jax.random.key(TINY["seed"]), SECTION_IDS.index("curvature"))
    for i, p in enumerate(loaded):
        ks = jax.random.split(jax.random.fold_in(key, i), 4)
        spec = hessian.eigenvalues(ks[0], train, p, k=3, which="top")
        got = stored["sections"]["curvature"]["models"][i]["eigenvalues"]["eigenvalues"]
        np.testing.assert_allclose(np.asarray(spec.eigenvalues), got, rtol=1e-5)
