"""The ``landscape`` command: version, documented default config, one-line errors before any work."""

import dataclasses
import os
import tomllib

import pytest

import probes.report
from probes.cli import check_out_dir, main
from probes.config import ConfigError, ReportConfig, parse_config
from probes.report import run_report

OFF = {k: "off" for k in ("connectivity", "surfaces", "curvature", "convexity", "determinism", "directedness")}


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit, match="0"):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"landscape {version('landscape')}"


def test_config_default_prints_the_documented_default(capsys):
    code, out, _ = run(["config", "--default"], capsys)
    assert code == 0
    assert parse_config(tomllib.loads(out)) == dataclasses.replace(ReportConfig(), source="<dict>")
    assert sum(line.startswith("# ") for line in out.splitlines()) >= 20


def test_config_checks_a_file(tmp_path, capsys):
    cfg = tmp_path / "base.toml"
    cfg.write_text("[train]\nepochs = 3\n")
    code, out, _ = run(["config", str(cfg)], capsys)
    assert code == 0 and tomllib.loads(out)["train"]["epochs"] == 3
    cfg.write_text("[model]\ndepth = 3\n")
    code, out, err = run(["config", str(cfg)], capsys)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"landscape: error: {cfg}: model.depth: unknown setting for model 'mlp'; "
                                        "accepted: ['name', 'widths', 'activation']"]


@pytest.mark.parametrize(
    ("text", "extra", "match"),
    [
        ("", ["--seed", "18446744073709551616"], "--seed: must be an int in [0, 2147482647], got 18446744073709551616"),
        ("", ["--seed", "-3"], "--seed: must be an int in [0, 2147482647], got -3"),
        ("[train]\nlearning_rate = nan\n", [], "train.learning_rate: must be a finite number > 0, got nan"),
        ("[train]\nmomentum = -5\n", [], "train.momentum: must be a finite number in [0, 1), got -5"),
        ("[train]\nbatch_size = 5000\n", [], "train.batch_size: must be <= 1437 (the training examples of dataset "
                                             "'digits'), got 5000"),
        ("[data]\ntest_fraction = 2.0\n", [], "base.toml: data: test_fraction must be a number in [0, 1), got 2.0"),
        ("[model]\nwidths = [4, -1]\n", [], "base.toml: model: MLP widths must be a non-empty sequence of positive"),
    ],
)
def test_config_errors_are_one_line_exit_2_before_any_folder(tmp_path, capsys, text, extra, match):
    cfg = tmp_path / "base.toml"
    cfg.write_text(text)
    out = tmp_path / "out"
    code, stdout, err = run(["report", str(cfg), "--out", str(out), "--quiet", *extra], capsys)
    assert code == 2 and stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("landscape: error: ") and match in lines[0], err
    assert not out.exists()


def test_out_that_cannot_be_written_is_a_one_line_error(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for bad, match in [(afile, "exists and is not a directory"), (afile / "sub", "is not a directory"),
                       ("/proc/landscape-report", "cannot be created: '/proc' is not writable")]:
        code, _, err = run(["report", "--out", str(bad), "--quiet"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and match in err, err
    before = set(os.listdir(tmp_path))
    check_out_dir(tmp_path / "new" / "deeper")  # creatable: fine, and nothing is created
    check_out_dir(tmp_path)
    assert set(os.listdir(tmp_path)) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="is not writable"):
            check_out_dir(ro)
        with pytest.raises(ConfigError, match="cannot be created: .* is not writable"):
            check_out_dir(ro / "out")
    finally:
        ro.chmod(0o700)


def test_internal_errors_keep_their_traceback(tmp_path, monkeypatch):
    def broken(*_args, **_kwargs):
        msg = "a bug inside a probe"
        raise ValueError(msg)

    monkeypatch.setattr(probes.report, "run_report", broken)
    with pytest.raises(ValueError, match="a bug inside a probe"):
        main(["report", "--out", str(tmp_path / "out"), "--quiet"])


def test_section_progress_lines_only_when_asked(tmp_path, capsys, monkeypatch):
    # the section loop with stand-in sections and zoo (the real ones are covered by test_report)
    ran = []

    def fake_section(name):
        def section(ctx):
            ran.append(name)
            return probes.report.Section(name, name, "", {"n": len(ctx.models)})
        return section

    monkeypatch.setattr(probes.report, "SECTIONS", tuple((n, fake_section(n)) for n, _ in probes.report.SECTIONS))
    monkeypatch.setattr(probes.report, "_train_member", lambda _parts, _config, i, _ckpt, _log: i)
    cfg = parse_config({"model": {"widths": [8]}, "sections": {**OFF, "curvature": "quick"}})
    run_report(cfg, tmp_path / "a", log=lambda _m: None, progress=True)
    err = capsys.readouterr().err.splitlines()
    assert err == ["landscape: [1/3] section models ...", "landscape: [2/3] section interpolation ...",
                   "landscape: [3/3] section curvature ..."]
    assert ran == ["models", "interpolation", "curvature"]
    run_report(cfg, tmp_path / "a", log=lambda _m: None)  # default: only on a terminal, and tests are not one
    assert capsys.readouterr().err == ""
