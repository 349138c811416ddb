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
import json
import tomllib
from pathlib import Path
from typing import Any

__all__ = ["DataConfig", "InterpolationConfig", "ModelConfig", "ReportConfig", "SectionsConfig", "TrainConfig", "load_config"]


def _fail(where: str, key: str, problem: str) -> None:
    msg = f"{where}: {key}: {problem}"
    raise ValueError(msg)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Dataset name and keyword arguments for :func:`landscape.data.load`."""

    name: str = "digits"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Zoo model name and constructor keyword arguments (:func:`landscape.models.build`)."""

    name: str = "mlp"
    options: dict[str, Any] = dataclasses.field(default_factory=lambda: {"widths": [128, 128]})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training settings (:func:`landscape.train.make_optimizer` and :class:`landscape.train.Trainer`)."""

    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"


@dataclasses.dataclass(frozen=True)
class InterpolationConfig:
    """Linear-path settings."""

    num: int = 25
    chunk: int = 5


SECTION_LEVELS = ("quick", "full", "off")


@dataclasses.dataclass(frozen=True)
class SectionsConfig:
    """Which probe sections run, and at which setting: ``"quick"`` (the default: the whole report
    within ~3 minutes on a 2-core CPU), ``"full"`` (the settings of the papers, slower) or ``"off"``."""

    connectivity: str = "quick"
    surfaces: str = "quick"
    curvature: str = "quick"
    convexity: str = "quick"
    determinism: str = "quick"
    directedness: str = "quick"


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """The whole report configuration; ``ReportConfig()`` is the built-in default."""

    seed: int = 0
    num_models: int = 2
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


_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _check_fields(cls: type, table: dict[str, Any], where: str, section: str) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            _fail(where, f"{section}.{key}", f"unknown key; accepted: {sorted(fields)}")
        kind = fields[key].type
        ok = _TYPES.get(kind, (object,))
        if isinstance(value, bool) and kind != "bool" or not isinstance(value, ok):
            _fail(where, f"{section}.{key}", f"expected {kind}, got {type(value).__name__} {value!r}")
        out[key] = float(value) if kind == "float" else value
    return out


def _positive(where: str, key: str, value: float, *, strict: bool = True) -> None:
    if value <= 0 if strict else value < 0:
        _fail(where, key, f"must be {'> 0' if strict else '>= 0'}, got {value!r}")


def parse_config(raw: dict[str, Any], *, source: str = "<dict>") -> ReportConfig:
    """Validate a parsed TOML mapping and build a :class:`ReportConfig` (ValueError on any problem)."""
    from landscape.train import OPTIMIZERS, SCHEDULES

    top = {"seed", "num_models", "data", "model", "train", "interpolation", "sections"}
    for key in raw:
        if key not in top:
            _fail(source, key, f"unknown key; accepted: {sorted(top)}")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        _fail(source, "seed", f"must be a non-negative int, got {seed!r}")
    num_models = raw.get("num_models", 2)
    if not isinstance(num_models, int) or isinstance(num_models, bool) or num_models < 2:
        _fail(source, "num_models", f"must be an int >= 2, got {num_models!r}")
    for section in ("data", "model", "train", "interpolation", "sections"):
        if section in raw and not isinstance(raw[section], dict):
            _fail(source, section, f"must be a table ([{section}]), got {type(raw[section]).__name__}")

    data_raw = dict(raw.get("data", {}))
    data = DataConfig(name=str(data_raw.pop("name", "digits")), options=data_raw)
    model_raw = dict(raw.get("model", {}))
    model_name = str(model_raw.pop("name", "mlp"))
    model = ModelConfig(name=model_name, options=model_raw or ({"widths": [128, 128]} if model_name == "mlp" else {}))
    train = TrainConfig(**_check_fields(TrainConfig, raw.get("train", {}), source, "train"))
    interp = InterpolationConfig(**_check_fields(InterpolationConfig, raw.get("interpolation", {}), source, "interpolation"))
    sections = SectionsConfig(**_check_fields(SectionsConfig, raw.get("sections", {}), source, "sections"))
    for f in dataclasses.fields(SectionsConfig):
        if getattr(sections, f.name) not in SECTION_LEVELS:
            _fail(source, f"sections.{f.name}", f"must be one of {list(SECTION_LEVELS)}, got {getattr(sections, f.name)!r}")

    for key in ("epochs", "batch_size", "learning_rate"):
        _positive(source, f"train.{key}", getattr(train, key))
    _positive(source, "train.weight_decay", train.weight_decay, strict=False)
    if train.optimizer not in OPTIMIZERS:
        _fail(source, "train.optimizer", f"unknown optimizer {train.optimizer!r}; accepted: {list(OPTIMIZERS)}")
    if train.schedule not in SCHEDULES:
        _fail(source, "train.schedule", f"unknown schedule {train.schedule!r}; accepted: {list(SCHEDULES)}")
    if interp.num < 3:
        _fail(source, "interpolation.num", f"must be >= 3, got {interp.num!r}")
    _positive(source, "interpolation.chunk", interp.chunk)
    return ReportConfig(
        seed=seed, num_models=num_models, data=data, model=model, train=train, interpolation=interp,
        sections=sections, source=source
    )


def load_config(path: str | Path | None) -> ReportConfig:
    """Read and validate a TOML config file; ``None`` gives the built-in default."""
    if path is None:
        return ReportConfig()
    p = Path(path)
    if not p.is_file():
        msg = f"config file {str(p)!r} does not exist or is not a file"
        raise ValueError(msg)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        msg = f"{p}: not valid TOML: {err}"
        raise ValueError(msg) from err
    return parse_config(raw, source=str(p))
