"""Report config: every key checked before work starts, errors name the file and the key."""

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from probes.config import (
    ConfigError,
    ReportConfig,
    TrainConfig,
    check_dataset_fit,
    config_markdown,
    config_toml,
    load_config,
    parse_config,
    with_seed,
)


def write(tmp_path, text):
    p = tmp_path / "cfg.toml"
    p.write_text(text)
    return p


def test_default_and_full_file(tmp_path):
    assert load_config(None) == ReportConfig()
    cfg = load_config(write(tmp_path, """
seed = 3
[data]
name = "digits"
test_fraction = 0.25
[model]
name = "mlp"
widths = [32]
[train]
epochs = 2
learning_rate = 0.01
[interpolation]
num = 11
"""))
    assert cfg.seed == 3 and cfg.train.epochs == 2 and cfg.train.learning_rate == 0.01
    assert cfg.data.options == {"test_fraction": 0.25} and cfg.model.options == {"widths": [32]}
    assert cfg.interpolation.num == 11 and cfg.source.endswith("cfg.toml")
    assert cfg.digest("data", "model", "train") != ReportConfig().digest("data", "model", "train")
    assert cfg.digest("train") == parse_config({"seed": 3, "train": {"epochs": 2, "learning_rate": 0.01}}).digest("train")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("sed = 1", r"cfg.toml: sed: unknown key"),
        ("[train]\nepoch = 3", r"train.epoch: unknown key; accepted: \['batch_size'"),
        ("[train]\nepochs = 'ten'", r"train.epochs: expected int, got str"),
        ("[train]\nepochs = 0", r"train.epochs: must be an int >= 1, got 0"),
        ("[train]\nepochs = true", r"train.epochs: expected int, got bool"),
        ("[train]\noptimizer = 'lamb'", r"train.optimizer: unknown value 'lamb'; accepted: \['sgd', 'adam', 'adamw'\]"),
        ("[train]\nschedule = 'step'", r"train.schedule: unknown value 'step'"),
        # cyclic needs cycle_steps, which [train] has no key for: refused up front, not at training time
        ("[train]\nschedule = 'cyclic'", r"train.schedule: unknown value 'cyclic'; accepted: \['constant'"),
        ("[train]\nlearning_rate = inf", r"cfg.toml: train.learning_rate: must be a finite number > 0, got inf"),
        ("[train]\nlearning_rate = nan", r"train.learning_rate: must be a finite number > 0, got nan"),
        ("[train]\nlearning_rate = -0.1", r"train.learning_rate: must be a finite number > 0, got -0.1"),
        ("[train]\nlearning_rate = 0", r"train.learning_rate: must be a finite number > 0, got 0"),
        ("[train]\nmomentum = -5", r"train.momentum: must be a finite number in \[0, 1\), got -5"),
        ("[train]\nmomentum = 1.0", r"train.momentum: must be a finite number in \[0, 1\), got 1.0"),
        ("[train]\nweight_decay = -1e-4", r"train.weight_decay: must be a finite number >= 0"),
        ("[train]\nweight_decay = inf", r"train.weight_decay: must be a finite number >= 0, got inf"),
        ("[interpolation]\nnum = 2", r"interpolation.num: must be an int >= 3, got 2"),
        ("[interpolation]\nchunk = 0", r"interpolation.chunk: must be an int >= 1, got 0"),
        ("[sections]\ncurvature = 'fast'", r"sections.curvature: unknown value 'fast'; accepted: \['quick', 'full', 'off'\]"),
        ("seed = -1", r"cfg.toml: seed: must be an int in \[0, "),
        ("seed = 9223372036854775807", r"seed: must be an int in \[0, 2147482647\]"),
        ("seed = 1.5", r"seed: expected int, got float"),
        ("num_models = 1", r"num_models: must be an int in \[2, 1000\], got 1"),
        ("data = 3", r"data: must be a table"),
        ("[train\nepochs=1", r"not valid TOML"),
        # [data] and [model] name the file and the key like the other tables
        ("[data]\nname = 'digitz'", r"cfg.toml: data.name: unknown value 'digitz'; accepted: \[.*'digits'"),
        ("[data]\nname = 3", r"cfg.toml: data.name: expected str, got int"),
        ("[data]\nnoise = 0.1", r"cfg.toml: data.noise: unknown setting for data 'digits'; accepted: \['name', 'test_fraction'"),
        ("[data]\nname = 'moons'\nsplit_seed = 1", r"data.split_seed: unknown setting for data 'moons'; accepted: \[.*'seed'"),
        ("[model]\ndepth = 3", r"cfg.toml: model.depth: unknown setting for model 'mlp'; accepted: \['name', 'widths', 'activation'\]"),
        ("[model]\nname = 'transformer'", r"cfg.toml: model.name: unknown value 'transformer'; accepted: \['cnn', 'gpt', 'mlp'"),
        ("[model]\nname = 'cnn'\nin_channels = 3", r"model.in_channels: unknown setting for model 'cnn'"),
    ],
)
def test_bad_config_is_named(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_good_edge_values_pass(tmp_path):
    cfg = load_config(write(tmp_path, "seed = 2147482647\n[train]\nmomentum = 0\nlearning_rate = 1\n"
                                      "[data]\nname = 'moons'\nseed = 3\nnum_samples = 100\n"))
    assert cfg.train.momentum == 0.0 and isinstance(cfg.train.learning_rate, float)
    assert cfg.data.options == {"seed": 3, "num_samples": 100} and cfg.seed == 2147482647


def test_with_seed_checks_like_the_file():
    assert with_seed(ReportConfig(), 7).seed == 7
    with pytest.raises(ConfigError, match=r"--seed: must be an int in \[0, 2147482647\], got 18446744073709551616"):
        with_seed(ReportConfig(), 18446744073709551616)
    with pytest.raises(ConfigError, match=r"--seed: must be an int in \[0, .*got -1"):
        with_seed(ReportConfig(), -1)


def test_batch_size_against_the_dataset():
    cfg = parse_config({"train": {"batch_size": 5000}}, source="base.toml")
    check_dataset_fit(cfg, num_train=5000)
    with pytest.raises(ConfigError, match=r"base.toml: train.batch_size: must be <= 1437 \(the training examples "
                                          r"of dataset 'digits'\), got 5000"):
        check_dataset_fit(cfg, num_train=1437)


def test_default_toml_parses_back_and_documents_every_key():
    text = config_toml()
    parsed = tomllib.loads(text)
    assert parse_config(parsed) == dataclasses.replace(ReportConfig(), source="<dict>")
    # every key line is directly preceded by a comment line saying what it is
    lines = text.splitlines()
    keys = [i for i, line in enumerate(lines) if re.match(r"^[a-z_]+ = ", line)]
    assert len(keys) == 2 + 1 + 2 + 7 + 2 + 6  # top, data, model (name, widths), train, interpolation, sections
    for i in keys:
        assert lines[i - 1].startswith("# ") and len(lines[i - 1]) > 10, lines[i]
    # every field of every table is present, with its default
    for section in ("train", "interpolation", "sections"):
        assert parsed[section] == ReportConfig().to_dict()[section]
    assert parsed["model"] == {"name": "mlp", "widths": [128, 128]} and parsed["data"] == {"name": "digits"}


def test_a_config_round_trips_through_toml(tmp_path):
    cfg = load_config(write(tmp_path, "seed = 4\n[model]\nname = 'cnn'\nwidths = [4, 8]\n[train]\n"
                                      "optimizer = 'sgd'\nmomentum = 0.5\n[sections]\ncurvature = 'off'\n"))
    again = parse_config(tomllib.loads(config_toml(cfg)), source=cfg.source)
    assert again == cfg


def test_docs_config_page_is_generated_from_the_config():
    page = (Path(__file__).parents[2] / "docs" / "config.md").read_text(encoding="utf-8")
    begin, end = "<!-- BEGIN GENERATED: probes.config.config_markdown() -->", "<!-- END GENERATED -->"
    assert begin in page and end in page
    generated = page.split(begin, 1)[1].split(end, 1)[0].strip() + "\n"
    assert generated == config_markdown(), "docs/config.md is stale: paste probes.config.config_markdown()"
    for f in dataclasses.fields(TrainConfig):
        assert f"`train.{f.name}`" in page


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
