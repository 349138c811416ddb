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
