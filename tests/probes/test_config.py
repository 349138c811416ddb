"""Report config: every key checked before work starts, errors name the file and the key."""

import pytest

from probes.config import ReportConfig, load_config, parse_config


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
        ("[train]\nepochs = 0", r"train.epochs: must be > 0"),
        ("[train]\nepochs = true", r"train.epochs: expected int, got bool"),
        ("[train]\noptimizer = 'lamb'", r"train.optimizer: unknown optimizer 'lamb'"),
        ("[train]\nschedule = 'step'", r"train.schedule: unknown schedule 'step'"),
        ("[interpolation]\nnum = 2", r"interpolation.num: must be >= 3"),
        ("seed = -1", r"seed: must be a non-negative int"),
        ("num_models = 1", r"num_models: must be an int >= 2"),
        ("data = 3", r"data: must be a table"),
        ("[train\nepochs=1", r"not valid TOML"),
    ],
)
def test_bad_config_is_named(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        load_config(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
