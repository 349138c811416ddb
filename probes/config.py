"""Report configuration: a TOML file, validated in full before any work starts.

Every key is known; an unknown key, a wrong type or a value out of range is a ``ValueError`` that
names the file, the key (``train.epochs``) and what is accepted. With no file the built-in default
runs: digits, two MLPs with hidden widths (128, 128), every section on its quick setting.

Example file::

    seed = 0

    [data]
    name = "digits"          # digits | mnist1d | blobs | moons

    [model]
    name = "mlp"             # mlp | cnn | resnet
    widths = [128, 128]      # hidden widths (mlp); the output layer is added

    [train]
    epochs = 30
    batch_size = 64
    optimizer = "adam"
    learning_rate = 1e-3

    [interpolation]
    num = 25

    [sections]               # each "quick" (default), "full" or "off"
    connectivity = "quick"
    surfaces = "quick"
    curvature = "full"
    convexity = "quick"
    determinism = "off"
    directedness = "quick"
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from landscape._checks import problem_choice, problem_float, problem_int

__all__ = [
    "MAX_SEED",
    "ConfigError",
    "DataConfig",
    "InterpolationConfig",
    "ModelConfig",
    "ReportConfig",
    "SectionsConfig",
    "TrainConfig",
    "check_dataset_fit",
    "config_markdown",
    "config_toml",
    "load_config",
    "parse_config",
    "with_seed",
]

MAX_SEED = 2**31 - 1
"""Model ``i`` uses init seed ``seed + i`` and data seed ``seed + 1000 + i``: all must fit an int32."""


class ConfigError(ValueError):
    """A problem with the configuration or the command line (the CLI prints it in one line, exit 2).

    A ``ValueError``, so callers catching ``ValueError`` keep working; errors raised while the
    report runs (a bug, a numerical failure) are not ``ConfigError`` and keep their traceback.
    """


def _fail(where: str, key: str, problem: str) -> None:
    msg = f"{where}: {key}: {problem}"
    raise ConfigError(msg)


def _setting(default: Any, doc: str, **check: Any) -> Any:
    """A dataclass field carrying its documentation and its check (the single source of truth
    for validation, ``landscape config --default`` and ``docs/config.md``)."""
    meta = {"doc": doc, "check": check}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: json.loads(json.dumps(default)), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _optimizers() -> tuple[str, ...]:
    from landscape.train import OPTIMIZERS

    return OPTIMIZERS


def _schedules() -> tuple[str, ...]:
    # "cyclic" needs cycle_steps, which a report's [train] table has no key for
    from landscape.train import SCHEDULES

    return tuple(s for s in SCHEDULES if s != "cyclic")


def _datasets() -> tuple[str, ...]:
    from landscape.data import DATASETS

    return tuple(sorted(DATASETS))


def _models() -> tuple[str, ...]:
    from landscape.models.registry import MODELS

    return tuple(sorted(MODELS))


SECTION_LEVELS = ("quick", "full", "off")

_TABLE_NOTES = {
    "sections": 'each section runs "quick" (the default settings), "full" (the settings of the papers, slower) or "off"',
}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Dataset name and keyword arguments for :func:`landscape.data.load`."""

    name: str = _setting("digits", "dataset name (landscape.data.load)", choices=_datasets)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Zoo model name and constructor keyword arguments (:func:`landscape.models.build`)."""

    name: str = _setting("mlp", "zoo model name (landscape.models.build)", choices=_models)
    options: dict[str, Any] = dataclasses.field(default_factory=lambda: {"widths": [128, 128]})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training settings (:func:`landscape.train.make_optimizer` and :class:`landscape.train.Trainer`)."""

    epochs: int = _setting(30, "epochs of training for every zoo member", low=1)
    batch_size: int = _setting(64, "examples per step; at most the number of training examples", low=1)
    optimizer: str = _setting("adam", "optax optimizer", choices=_optimizers)
    learning_rate: float = _setting(1e-3, "peak learning rate (finite, > 0)", low=0.0, low_open=True)
    momentum: float = _setting(0.9, "SGD momentum in [0, 1) (used by optimizer = \"sgd\")", low=0.0, high=1.0,
                               high_open=True)
    weight_decay: float = _setting(0.0, "weight decay >= 0 (decoupled for adamw, an L2 term otherwise)", low=0.0)
    schedule: str = _setting("constant", "learning-rate schedule over the run", choices=_schedules)


@dataclasses.dataclass(frozen=True)
class InterpolationConfig:
    """Linear-path settings."""

    num: int = _setting(25, "points on the linear path between models 0 and 1, ends included", low=3)
    chunk: int = _setting(5, "path points evaluated at once (bounds memory)", low=1)


@dataclasses.dataclass(frozen=True)
class SectionsConfig:
    """Which probe sections run, and at which setting: ``"quick"`` (the default: the whole report
    within ~3 minutes on a 2-core CPU), ``"full"`` (the settings of the papers, slower) or ``"off"``."""

    connectivity: str = _setting("quick", "barriers naive / weight matching / activation matching / REPAIR, "
                                 "Bezier curves", choices=SECTION_LEVELS)
    surfaces: str = _setting("quick", "loss surfaces: a random plane and the plane through the models",
                             choices=SECTION_LEVELS)
    curvature: str = _setting("quick", "Hessian eigenvalues, trace and spectral density", choices=SECTION_LEVELS)
    convexity: str = _setting("quick", "mode convexity from FGE basin members", choices=SECTION_LEVELS)
    determinism: str = _setting("quick", "instability analysis: children spawned at step k",
                                choices=SECTION_LEVELS)
    directedness: str = _setting("quick", "task vectors and merges", choices=SECTION_LEVELS)


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """The whole report configuration; ``ReportConfig()`` is the built-in default."""

    seed: int = _setting(0, "base seed: model i has init seed seed + i and data-order seed seed + 1000 + i",
                         low=0, high=MAX_SEED - 1000)
    num_models: int = _setting(2, "independently trained zoo members (>= 2)", low=2, high=1000)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    interpolation: InterpolationConfig = dataclasses.field(default_factory=InterpolationConfig)
    sections: SectionsConfig = dataclasses.field(default_factory=SectionsConfig)
    source: str = "<built-in default>"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe nested dict (what ``results.json`` records)."""
        d = dataclasses.asdict(self)
        d.pop("source")
        return d

    def digest(self, *sections: str) -> str:
        """A stable hex digest of the named sections (for checkpoint cache names)."""
        import hashlib

        d = self.to_dict()
        blob = json.dumps({s: d[s] for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


_TABLES: dict[str, type] = {
    "data": DataConfig, "model": ModelConfig, "train": TrainConfig, "interpolation": InterpolationConfig,
    "sections": SectionsConfig,
}
_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _documented(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "doc" in f.metadata]


def _problem(field: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with ``value`` for ``field`` (its type, then the check in its metadata)."""
    kind, check = field.type, dict(field.metadata.get("check", {}))
    ok = _TYPES.get(kind, (object,))
    if isinstance(value, bool) and kind != "bool" or not isinstance(value, ok):
        return f"expected {kind}, got {type(value).__name__} {value!r}"
    if "choices" in check:
        choices = check.pop("choices")
        return problem_choice(value, choices() if callable(choices) else choices)
    if kind == "int":
        return problem_int(value, low=check.get("low"), high=check.get("high"))
    if kind == "float":
        return problem_float(value, **check)
    return None


def _check_value(cls: type, key: str, value: Any, where: str, prefix: str) -> Any:
    field = {f.name: f for f in dataclasses.fields(cls)}[key]
    problem = _problem(field, value)
    if problem is not None:
        _fail(where, f"{prefix}{key}", problem)
    return float(value) if field.type == "float" else value


def _check_fields(cls: type, table: dict[str, Any], where: str, section: str) -> dict[str, Any]:
    names = [f.name for f in _documented(cls)]
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in names:
            _fail(where, f"{section}.{key}", f"unknown key; accepted: {sorted(names)}")
        out[key] = _check_value(cls, key, value, where, f"{section}.")
    return out


def dataset_settings(name: str) -> list[str]:
    """The ``[data]`` keys accepted for dataset ``name`` besides ``name`` (its loader's keywords)."""
    from landscape.data import DATASETS

    params = inspect.signature(DATASETS[name]).parameters
    keys = [p for p in params if p != "key"]
    return ["seed", *[k for k in keys if k != "seed"]] if "key" in params else keys


_FILLED = ("in_features", "in_channels", "num_classes", "vocab_size", "context", "image_size", "channels")
"""Model arguments the report fills from the dataset (never set in ``[model]``): the input size and
classes of an MLP / CNN, the vocabulary and context of a ``"gpt"`` (from a token dataset), the image
side, channels and classes of a ``"vit"``."""


def model_settings(name: str) -> list[str]:
    """The ``[model]`` keys accepted for zoo model ``name`` besides ``name`` (constructor arguments
    the report does not fill from the dataset; for ``"mlp"``, ``widths`` are the hidden widths)."""
    from landscape.models.registry import MODELS, _arguments

    required, optional = _arguments(MODELS[name])
    return [a for a in (*required, *optional) if a not in _FILLED]


def _check_table(where: str, section: str, cls: type, table: dict[str, Any],
                 accepted: Callable[[str], list[str]]) -> tuple[str, dict[str, Any]]:
    raw = dict(table)
    name = _check_value(cls, "name", raw.pop("name", getattr(cls(), "name")), where, f"{section}.")
    keys = accepted(name)
    for key in raw:
        if key not in keys:
            _fail(where, f"{section}.{key}", f"unknown setting for {section} {name!r}; accepted: {['name', *keys]}")
    return name, raw


def parse_config(raw: dict[str, Any], *, source: str = "<dict>") -> ReportConfig:
    """Validate a parsed TOML mapping and build a :class:`ReportConfig`.

    Raises:
        ConfigError: (a ``ValueError``) naming ``source``, the key and what is accepted, on an
            unknown key, a wrong type or a value out of range. Settings that need the dataset
            (``train.batch_size`` against its size) are checked by :func:`check_dataset_fit`.
    """
    top = [f.name for f in dataclasses.fields(ReportConfig) if f.name != "source"]
    for key in raw:
        if key not in top:
            _fail(source, key, f"unknown key; accepted: {sorted(top)}")
    for section in _TABLES:
        if section in raw and not isinstance(raw[section], dict):
            _fail(source, section, f"must be a table ([{section}]), got {type(raw[section]).__name__}")
    seed = _check_value(ReportConfig, "seed", raw.get("seed", 0), source, "")
    num_models = _check_value(ReportConfig, "num_models", raw.get("num_models", 2), source, "")

    data_name, data_opts = _check_table(source, "data", DataConfig, raw.get("data", {}), dataset_settings)
    model_name, model_opts = _check_table(source, "model", ModelConfig, raw.get("model", {}), model_settings)
    if model_name == "mlp" and not model_opts:
        model_opts = ModelConfig().options
    train = TrainConfig(**_check_fields(TrainConfig, raw.get("train", {}), source, "train"))
    interp = InterpolationConfig(**_check_fields(InterpolationConfig, raw.get("interpolation", {}), source,
                                                 "interpolation"))
    sections = SectionsConfig(**_check_fields(SectionsConfig, raw.get("sections", {}), source, "sections"))
    return ReportConfig(
        seed=seed, num_models=num_models, data=DataConfig(data_name, data_opts),
        model=ModelConfig(model_name, model_opts), train=train, interpolation=interp, sections=sections,
        source=source,
    )


def with_seed(config: ReportConfig, seed: Any, *, where: str = "--seed") -> ReportConfig:
    """``config`` with its seed replaced, checked like the file's ``seed`` (ConfigError naming ``where``)."""
    field = {f.name: f for f in dataclasses.fields(ReportConfig)}["seed"]
    problem = _problem(field, seed)
    if problem is not None:
        msg = f"{where}: {problem}"
        raise ConfigError(msg)
    return dataclasses.replace(config, seed=int(seed))


def check_dataset_fit(config: ReportConfig, *, num_train: int) -> None:
    """The checks that need the loaded dataset: ``train.batch_size`` at most its training examples.

    Called by the report after loading the data and before creating any folder.
    """
    if config.train.batch_size > num_train:
        _fail(config.source, "train.batch_size",
              f"must be <= {num_train} (the training examples of dataset {config.data.name!r}), "
              f"got {config.train.batch_size}")


def load_config(path: str | Path | None) -> ReportConfig:
    """Read and validate a TOML config file; ``None`` gives the built-in default (ConfigError on any problem)."""
    if path is None:
        return ReportConfig()
    p = Path(path)
    if not p.is_file():
        msg = f"config file {str(p)!r} does not exist or is not a file"
        raise ConfigError(msg)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        msg = f"{p}: not valid TOML: {err}"
        raise ConfigError(msg) from err
    return parse_config(raw, source=str(p))


# ---------------------------------------------------------------------------- documentation
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    msg = f"cannot write {type(value).__name__} {value!r} as TOML"
    raise ValueError(msg)


def _accepted(field: dataclasses.Field, *, markdown: bool = False) -> str:
    check = dict(field.metadata.get("check", {}))
    if "choices" in check:
        choices = check["choices"]() if callable(check["choices"]) else check["choices"]
        return ", ".join(f"`{c}`" for c in choices) if markdown else " | ".join(choices)
    return ""


def _comment(field: dataclasses.Field) -> str:
    accepted = _accepted(field)
    return f"# {field.metadata['doc']}" + (f"; one of: {accepted}" if accepted else "")


def config_toml(config: ReportConfig | None = None) -> str:
    """``config`` (default: the built-in default) as a TOML file with every key documented in a comment.

    Generated from the fields of the config dataclasses, so it cannot drift from what
    :func:`parse_config` accepts; ``parse_config(tomllib.loads(config_toml(c)))`` equals ``c``.
    """
    config = ReportConfig() if config is None else config
    lines = ["# landscape report configuration (landscape report CONFIG.toml); every key is optional.", ""]
    for f in _documented(ReportConfig):
        lines += [_comment(f), f"{f.name} = {_toml_value(getattr(config, f.name))}"]
    for section, cls in _TABLES.items():
        table = getattr(config, section)
        lines += ["", f"[{section}]"]
        if section in _TABLE_NOTES:
            lines.append(f"# {_TABLE_NOTES[section]}")
        for f in _documented(cls):
            lines += [_comment(f), f"{f.name} = {_toml_value(getattr(table, f.name))}"]
        if section in ("data", "model"):
            settings = (dataset_settings if section == "data" else model_settings)(table.name)
            what = "the dataset loader's" if section == "data" else "the model constructor's"
            lines.append(f"# other keys: {what} settings; for {table.name!r}: {', '.join(settings) or '(none)'}")
            for key, value in table.options.items():
                doc = "hidden widths; the output layer is added" if (section, key) == ("model", "widths") else \
                    f"a setting of {table.name!r}"
                lines += [f"# {doc}", f"{key} = {_toml_value(value)}"]
    return "\n".join(lines) + "\n"


def config_markdown() -> str:
    """The key reference of ``docs/config.md`` (generated here; a test checks the page against it)."""
    lines = []
    top = [(f"`{f.name}`", f) for f in _documented(ReportConfig)]
    tables = [("", top)] + [(s, [(f"`{s}.{f.name}`", f) for f in _documented(c)]) for s, c in _TABLES.items()]
    for section, rows in tables:
        lines += ["", f"### {'top level' if not section else f'[{section}]'}", ""]
        if section in _TABLE_NOTES:
            lines += [_TABLE_NOTES[section][0].upper() + _TABLE_NOTES[section][1:] + ".", ""]
        lines += ["| key | default | accepted | meaning |", "|---|---|---|---|"]
        for label, f in rows:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            check = dict(f.metadata.get("check", {}))
            accepted = _accepted(f, markdown=True) or _range_text(f.type, check)
            lines.append(f"| {label} | `{_toml_value(default)}` | {accepted} | {f.metadata['doc']} |")
        if section == "data":
            lines += ["", "Other `[data]` keys are the settings of the chosen dataset's loader:", ""]
            lines += [f"- `{n}`: {', '.join(f'`{k}`' for k in dataset_settings(n)) or '(none)'}" for n in _datasets()]
        if section == "model":
            lines += ["", "Other `[model]` keys are the constructor settings of the chosen model (the report fills "
                      "`in_features` / `in_channels` and `num_classes` from the dataset, `vocab_size` and `context` "
                      "of a `gpt` from a token dataset, `image_size`, `channels` and `num_classes` of a `vit`; for "
                      "`mlp`, `widths` are the hidden widths, default `[128, 128]`):", ""]
            lines += [f"- `{n}`: {', '.join(f'`{k}`' for k in model_settings(n)) or '(none)'}" for n in _models()]
    return "\n".join(lines).strip() + "\n"


def _range_text(kind: str, check: dict[str, Any]) -> str:
    low, high = check.get("low"), check.get("high")
    finite = "finite " if kind == "float" else ""
    if low is not None and high is not None:
        lo, hi = ("(" if check.get("low_open") else "["), (")" if check.get("high_open") else "]")
        return f"{finite}{kind} in {lo}{low}, {high}{hi}"
    if low is not None:
        return f"{finite}{kind} {'>' if check.get('low_open') else '>='} {low}"
    return kind
