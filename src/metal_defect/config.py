"""Load, merge and validate the three configuration files into one typed object.

`config/config.yaml` says where things live, `params.yaml` how to train (a `base`
section plus one per stage), `schema.yaml` what a dataset must look like. The three are
read once, merged with `key=value` overrides from the command line and checked against
the dataclasses below before any work starts. Every problem is reported with the file,
the dotted key, the value and what is allowed; a typo gets the closest valid key.

Relative paths inside the files resolve against the folder given by `--config` (the
checkout's top level by default); relative paths in command-line overrides resolve
against the current directory, as a shell user expects.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from metal_defect.errors import ConfigError

CONFIG_FILE_CANDIDATES = ("config/config.yaml", "config.yaml")
PARAMS_FILE = "params.yaml"
SCHEMA_FILE = "schema.yaml"


def _f(default: Any = dataclasses.MISSING, **meta: Any) -> Any:
    """A dataclass field carrying validation metadata (ge, le, gt, lt, min_len, path_like...)."""
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- config.yaml
@dataclass(frozen=True)
class PathsConfig:
    """Where artifacts, logs and downloaded archives live."""

    artifacts: Path
    logs: Path
    download_cache: Path
    tuning: Path | None  # Keras Tuner projects (null: <artifacts>/tuning); a folder every tuning machine can reach

    @property
    def tuning_root(self) -> Path:
        return self.tuning or self.artifacts / "tuning"


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"]


# ----------------------------------------------------------------------------- params.yaml
@dataclass(frozen=True)
class BaseParams:
    """Settings every stage that touches images or randomness shares."""

    seed: int = _f(ge=0, le=2**31 - 1)
    image_size: int | Literal["auto"] = _f(ge=16, le=1024)
    max_image_size: int = _f(ge=16, le=1024)
    resize: Literal["pad", "stretch"] = _f()
    color_mode: Literal["grayscale", "rgb"] = _f()
    deterministic_ops: bool = _f()


@dataclass(frozen=True)
class DataIngestionParams:
    source: str = _f(path_like=True)
    sha256: str | None = _f(pattern="^[0-9a-f]{64}$")
    max_archive_members: int = _f(ge=1)
    max_extracted_mb: float = _f(gt=0)
    max_compression_ratio: float = _f(ge=1)
    max_download_mb: float = _f(gt=0)


@dataclass(frozen=True)
class SplitParams:
    train: float = _f(gt=0, lt=1)
    valid: float = _f(gt=0, lt=1)
    test: float = _f(ge=0, lt=1)

    def check(self, key: str) -> list[str]:
        total = self.train + self.valid + self.test
        if abs(total - 1.0) > 1e-6:
            return [f"{key}: train + valid + test = {total:g}; the three fractions must sum to 1"]
        return []


@dataclass(frozen=True)
class DataPreprocessingParams:
    split: SplitParams
    max_file_mb: float = _f(gt=0)
    max_image_pixels: int = _f(ge=1)
    min_image_side: int = _f(ge=1)
    min_pixel_std: float = _f(ge=0, lt=1)
    eda_samples_per_class: int = _f(ge=1, le=64)


@dataclass(frozen=True)
class AugmentationParams:
    flip_horizontal: bool
    flip_vertical: bool
    rotate90: bool
    rotation_degrees: float = _f(ge=0, le=180)
    brightness: float = _f(ge=0, le=1)
    contrast: float = _f(ge=0, le=1)
    noise_std: float = _f(ge=0, le=1)
    resample_blur: float = _f(ge=0, lt=1)


@dataclass(frozen=True)
class DataLoaderParams:
    batch_size: int = _f(ge=1, le=4096)
    shuffle_buffer: int = _f(ge=1)
    cache_max_mb: float = _f(ge=0)
    augmentation: AugmentationParams = _f()


@dataclass(frozen=True)
class CustomCnnParams:
    """The in-house CNN: one conv block (conv-BN-ReLU x convs, max-pool) per `filters` entry."""

    filters: list[int] = _f(min_len=1)
    convs_per_block: int = _f(ge=1, le=4)
    kernel_size: int = _f(ge=1, le=11)
    bn_momentum: float = _f(ge=0, lt=1)
    dropout: float = _f(ge=0, lt=1)
    dense_units: int = _f(ge=0)
    pooling: Literal["avg", "max", "avg_max"] = _f()
    input_normalization: Literal["dataset", "per_image", "scale"] = _f()
    input_scale: float = _f(ge=0.25, le=1)  # the network sees this share of the prepared resolution (resized inside the model)


@dataclass(frozen=True)
class TransferParams:
    """Backbones from keras.applications (VGG16, ResNet50, MobileNetV2, EfficientNetB0, ...)."""

    weights: str = _f(path_like=True, keywords=("imagenet", "none"))
    offline_fallback: Literal["random", "error"] = _f()
    dropout: float = _f(ge=0, lt=1)
    dense_units: int = _f(ge=0)
    fine_tune_layers: int = _f(ge=0)
    fine_tune_epochs: int = _f(ge=0)
    fine_tune_learning_rate: float = _f(gt=0)


@dataclass(frozen=True)
class ModelParams:
    custom_cnn: CustomCnnParams
    transfer: TransferParams


@dataclass(frozen=True)
class EarlyStoppingParams:
    enabled: bool
    monitor: Literal["val_loss", "val_accuracy"]
    patience: int = _f(ge=1)


@dataclass(frozen=True)
class PlateauParams:
    factor: float = _f(gt=0, lt=1)
    patience: int = _f(ge=1)
    min_lr: float = _f(ge=0)


@dataclass(frozen=True)
class CallbacksParams:
    checkpoint_monitor: Literal["val_loss", "val_accuracy"]
    early_stopping: EarlyStoppingParams
    lr_schedule: Literal["cosine", "plateau", "constant"]
    warmup_epochs: int = _f(ge=0)
    plateau: PlateauParams = _f()
    tensorboard: bool = _f()
    csv_logger: bool = _f()
    backup_and_restore: bool = _f()


@dataclass(frozen=True)
class TrainParams:
    models: list[str] = _f(min_len=1)
    epochs: int = _f(ge=1)
    min_steps: int = _f(ge=0)
    optimizer: Literal["adamw", "adam", "sgd"] = _f()
    learning_rate: float = _f(gt=0, le=1)
    weight_decay: float = _f(ge=0)
    label_smoothing: float = _f(ge=0, lt=1)
    class_weights: bool | Literal["auto"] = _f()
    class_weight_power: float = _f(ge=0, le=1)
    strategy: Literal["auto", "one_device", "mirrored"] = _f()
    mixed_precision: bool = _f()
    verbose: Literal[0, 1, 2] = _f()


@dataclass(frozen=True)
class EvaluationParams:
    select_metric: Literal["macro_f1", "accuracy"]
    calibration_bins: int = _f(ge=2, le=100)
    bootstrap_samples: int = _f(ge=100)
    temperature_min: float = _f(gt=0)
    temperature_max: float = _f(gt=0)
    misclassified_max: int = _f(ge=0, le=200)
    batch_size: int = _f(ge=1)
    gate_min_train_accuracy: float = _f(ge=0, le=1)
    gate_majority_margin: float = _f(ge=0, le=1)
    gate_good_macro_f1: float = _f(ge=0, le=1)
    uncertain_review_cost: float = _f(gt=0, lt=1)
    uncertain_max_share: float = _f(ge=0, le=1)
    ood_neighbours: int | Literal["auto"] = _f(ge=1, le=10000)
    ood_valid_quantile: float = _f(gt=0.5, le=1)
    annotations: str | None = _f(path_like=True)

    def check(self, key: str) -> list[str]:
        if self.temperature_min >= self.temperature_max:
            return [f"{key}: temperature_min ({self.temperature_min}) must be below temperature_max ({self.temperature_max})"]
        return []


@dataclass(frozen=True)
class RangeParam:
    """A continuous hyperparameter: uniform between min and max, or log-uniform (`log: true`)."""

    min: float
    max: float
    log: bool

    def check(self, key: str) -> list[str]:
        problems = []
        if self.min >= self.max:
            problems.append(f"{key}: min ({self.min:g}) must be below max ({self.max:g}); for one value give a list, e.g. [{self.min:g}]")
        if self.log and self.min <= 0:
            problems.append(f"{key}: log sampling needs min > 0 (got {self.min:g})")
        return problems


# Each entry: null (not searched: the value in its own section is used), a list (the values to
# choose from) or, for continuous ones, a range {min, max, log}. A list and a range are told apart
# by their shape, so no tag is needed.
Choices = list[float] | RangeParam | None


# (low, high) each searched value or range end must lie in: the bounds of the key it lands in
SEARCH_BOUNDS: dict[str, tuple[float, float]] = {"learning_rate": (1e-7, 1.0), "batch_size": (1, 4096), "blocks": (1, 8), "width": (0.125, 8.0), "convs_per_block": (1, 4),
    "dropout": (0.0, 0.95), "dense_units": (0, 8192), "input_scale": (0.25, 1.0), "rotation_degrees": (0.0, 180.0),
    "brightness": (0.0, 1.0), "contrast": (0.0, 1.0), "noise_std": (0.0, 1.0), "resample_blur": (0.0, 0.95), "fine_tune_layers": (0, 10000)}


@dataclass(frozen=True)
class SearchSpaceParams:
    """What the c07 search may change, and where each value lands when a trial runs."""

    learning_rate: Choices          # train.learning_rate
    batch_size: list[int] | None    # data_loader.batch_size
    blocks: list[int] | None        # model.custom_cnn: number of conv blocks (filters doubled per extra block, capped at 512)
    width: list[float] | None       # model.custom_cnn: every filter count times this
    convs_per_block: list[int] | None
    pooling: list[Literal["avg", "max", "avg_max"]] | None
    dropout: Choices
    dense_units: list[int] | None
    input_scale: list[float] | None  # model.custom_cnn.input_scale: the share of the prepared resolution the network sees
    rotation_degrees: Choices       # data_loader.augmentation.*
    brightness: Choices
    contrast: Choices
    noise_std: Choices
    resample_blur: Choices
    fine_tune_layers: list[int] | None  # model.transfer: top backbone layers trained (pretrained backbones)

    def check(self, key: str) -> list[str]:
        problems = []
        for name, value in self.searched().items():
            if value == []:
                problems.append(f"{key}.{name}: an empty list; give values to choose from, or null to leave it out of the search")
            if name in SEARCH_BOUNDS:
                low, high = SEARCH_BOUNDS[name]
                values = [value.min, value.max] if isinstance(value, RangeParam) else value
                bad = [v for v in values if v is not None and not low <= v <= high]
                if bad:
                    problems.append(f"{key}.{name}: {bad} outside {low:g}..{high:g}")
        return problems

    def searched(self) -> dict[str, Any]:
        """The entries that are searched (not null), by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class TuningParams:
    """c07: a Keras Tuner search around the best base model."""

    enabled: bool
    model: str = _f(keywords=("best",))   # best (the best base model of evaluation) or a name in train.models
    tuner: Literal["random", "bayesian", "hyperband"] = _f()
    max_trials: int = _f(ge=1, le=10000)
    epochs_per_trial: int = _f(ge=1)
    objective: Literal["val_loss", "val_accuracy"] = _f()
    seed: int = _f(ge=0, le=2**31 - 1)
    max_minutes: float = _f(gt=0)
    max_consecutive_failed_trials: int = _f(ge=1)
    space: SearchSpaceParams = _f()


# ----------------------------------------------------------------------------- schema.yaml
@dataclass(frozen=True)
class SchemaConfig:
    """The dataset contract: classes (their order is the label encoding) and what files count."""

    classes: list[str] | Literal["auto"] = _f(min_len=2)
    aliases: dict[str, list[str]] = _f()
    extensions: list[str] = _f(min_len=1)
    color_mode: Literal["grayscale", "rgb"] = _f()
    min_images_per_class: int = _f(ge=1)

    def check(self, key: str) -> list[str]:
        problems = []
        if isinstance(self.classes, list) and len(set(self.classes)) != len(self.classes):
            problems.append(f"{key}.classes: {self.classes} lists a class twice")
        if isinstance(self.classes, list):
            for name in self.aliases:
                if name not in self.classes:
                    close = difflib.get_close_matches(name, self.classes, n=1)
                    hint = f"; did you mean '{close[0]}'?" if close else ""
                    problems.append(f"{key}.aliases.{name}: not a class in {key}.classes{hint}")
        seen: dict[str, str] = {}
        for name, names in self.aliases.items():
            for alias in names:
                other = seen.setdefault(alias.lower(), name)
                if other != name:
                    problems.append(f"{key}.aliases: '{alias}' is an alias of both '{other}' and '{name}'")
        for ext in self.extensions:
            if not ext.startswith("."):
                problems.append(f"{key}.extensions: '{ext}' must start with a dot, e.g. '.{ext}'")
        return problems


# ----------------------------------------------------------------------------- the recipe
@dataclass(frozen=True)
class Recipe:
    """The sections a model is trained from: the train stage's, and what a tuning trial starts from."""

    base: BaseParams
    data_loader: DataLoaderParams
    model: ModelParams
    callbacks: CallbacksParams
    train: TrainParams

    @classmethod
    def of(cls, config: Config) -> Recipe:
        return cls(**{name: getattr(config, name) for name in RECIPE_SECTIONS})

    @classmethod
    def from_plain(cls, data: dict[str, Any]) -> Recipe:
        """Validate a recipe written with `to_plain` (a trial's spec) back into its sections."""
        types_of = typing.get_type_hints(cls)
        return cls(**{name: parse_section(types_of[name], data[name], name) for name in RECIPE_SECTIONS})


RECIPE_SECTIONS = tuple(f.name for f in dataclasses.fields(Recipe))


# ----------------------------------------------------------------------------- the whole
@dataclass(frozen=True)
class Config:
    """Everything a run needs, validated. Sections are what stages declare and receive."""

    paths: PathsConfig
    logging: LoggingConfig
    base: BaseParams
    data_ingestion: DataIngestionParams
    data_preprocessing: DataPreprocessingParams
    data_loader: DataLoaderParams
    model: ModelParams
    callbacks: CallbacksParams
    train: TrainParams
    evaluation: EvaluationParams
    tuning: TuningParams
    schema: SchemaConfig
    config_dir: Path = field(default=Path("."), metadata={"internal": True})

    def section(self, name: str) -> Any:
        """Return one top-level section by name (what the runner hands a stage)."""
        if name not in SECTION_FILES:
            raise ConfigError(f"unknown config section '{name}'")
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML/JSON-serialisable view (paths as strings), without internals."""
        return {name: to_plain(getattr(self, name)) for name in SECTION_FILES}


# Which file each top-level section comes from. schema.yaml is the `schema` section whole.
SECTION_FILES: dict[str, str] = {
    "paths": "config.yaml",
    "logging": "config.yaml",
    "base": PARAMS_FILE,
    "data_ingestion": PARAMS_FILE,
    "data_preprocessing": PARAMS_FILE,
    "data_loader": PARAMS_FILE,
    "model": PARAMS_FILE,
    "callbacks": PARAMS_FILE,
    "train": PARAMS_FILE,
    "evaluation": PARAMS_FILE,
    "tuning": PARAMS_FILE,
    "schema": SCHEMA_FILE,
}


def to_plain(value: Any) -> Any:
    """Convert dataclasses, paths and tuples into JSON-friendly builtins."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: to_plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not f.metadata.get("internal")
        }
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def fingerprint_of(value: Any) -> str:
    """A stable sha256 of any config value (sections, lists, scalars)."""
    text = json.dumps(to_plain(value), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- loading
def default_config_dir() -> Path:
    """The checkout holding params.yaml: $METAL_DEFECT_HOME, the source checkout, or cwd."""
    env = os.environ.get("METAL_DEFECT_HOME")
    if env:
        return Path(env).resolve()
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / PARAMS_FILE).is_file():
        return checkout
    return Path.cwd().resolve()


def load_config(config_dir: Path | str | None = None, overrides: list[str] | None = None) -> Config:
    """Read the three YAML files in `config_dir`, apply `key=value` overrides and validate.

    Raises ConfigError listing every problem found (file, key, value, what is allowed).
    """
    config_dir = Path(config_dir).resolve() if config_dir else default_config_dir()
    if not config_dir.is_dir():
        raise ConfigError(f"--config {config_dir}: no such folder; it must hold params.yaml, schema.yaml and config/config.yaml")
    raw: dict[str, Any] = {}
    origins: dict[str, str] = {}
    config_file = next((config_dir / c for c in CONFIG_FILE_CANDIDATES if (config_dir / c).is_file()), None)
    files = {
        "config.yaml": config_file or config_dir / CONFIG_FILE_CANDIDATES[0],
        PARAMS_FILE: config_dir / PARAMS_FILE,
        SCHEMA_FILE: config_dir / SCHEMA_FILE,
    }
    for label, path in files.items():
        data = _read_yaml(path)
        if label == SCHEMA_FILE:
            raw["schema"] = data
            origins["schema"] = label
            continue
        for key, value in data.items():
            if SECTION_FILES.get(key) != label:
                owner = SECTION_FILES.get(key)
                if owner:
                    raise ConfigError(f"{label}: section '{key}' belongs in {owner}, not {label}")
                owned = [k for k, f in SECTION_FILES.items() if f == label]
                raise ConfigError(f"{label}: unknown section '{key}'{_suggest(key, owned)}; allowed: {', '.join(owned)}")
            raw[key] = value
            origins[key] = label
    for override in overrides or []:
        _apply_override(raw, origins, override)
    problems: list[str] = []
    sections = {}
    for name, label in SECTION_FILES.items():
        cls = _field_types(Config)[name]
        if name not in raw:
            problems.append(f"{label}: missing section '{name}'")
            continue
        sections[name] = _convert(raw[name], cls, name, {}, origins, config_dir, problems)
    if "paths" in sections:
        problems.extend(_system_folder_problems(sections["paths"], origins.get("paths", "config.yaml")))
    if problems:
        if len(problems) == 1:
            raise ConfigError(f"invalid configuration: {problems[0]}")
        raise ConfigError(f"invalid configuration ({len(problems)} problems):\n  " + "\n  ".join(problems))
    return Config(**sections, config_dir=config_dir)


# Folders the program writes under: never the file system's root or a system folder, where a typo
# (`artifacts: /`) would write `/stages` and `/runs` beside the operating system's own.
SYSTEM_FOLDERS = {Path(p) for p in ("/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/root", "/run", "/sbin",
                                    "/sys", "/usr", "/var", "/home", "/opt", "/srv", "/mnt", "/media", "/tmp")}


def _system_folder_problems(paths: PathsConfig, label: str) -> list[str]:
    problems = []
    for key in ("artifacts", "logs", "download_cache", "tuning"):
        folder = getattr(paths, key)
        if folder is not None and Path(folder).resolve() in SYSTEM_FOLDERS:
            problems.append(f"{label}: paths.{key} = {folder} is a system folder; give a folder of its own (e.g. {Path(folder) / 'metal-defect'})")
    return problems


def parse_section(cls: type, value: Any, key: str) -> Any:
    """Validate a plain value (e.g. a section written with `to_plain`) into `cls`; ConfigError lists the problems."""
    problems: list[str] = []
    result = _convert(value, cls, key, {}, {}, Path("."), problems)
    if problems:
        raise ConfigError(f"invalid {key}: " + "; ".join(problems))
    return result


MAX_YAML_BYTES = 1_000_000  # the three files are a few kilobytes
MAX_YAML_NODES = 100_000  # values after aliases (*name) are expanded: an alias bomb expands to billions


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (YAML keeps the last silently),
    and a document whose aliases would expand past MAX_YAML_NODES values is refused before it is built."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_YAML_NODES:
            raise yaml.composer.ComposerError(None, None, f"more than {MAX_YAML_NODES:,} values once its aliases (*name) are expanded; "
                                              "write the values out instead of nesting aliases", node.start_mark)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' appears twice (lines {seen[key]} and {line}); keep one",
                                                        key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values `node` stands for with every alias expanded (each shared node counted once per use)."""
    if id(node) not in sizes:
        sizes[id(node)] = 1  # a node that contains itself (a recursive alias) is counted once, not forever
        if isinstance(node, yaml.SequenceNode):
            sizes[id(node)] = 1 + sum(min(_expanded_size(child, sizes), MAX_YAML_NODES + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            sizes[id(node)] = 1 + sum(min(_expanded_size(k, sizes) + _expanded_size(v, sizes), MAX_YAML_NODES + 1) for k, v in node.value)
    return sizes[id(node)]


def load_yaml_text(text: str) -> Any:
    """Parse YAML safely, refusing duplicate keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.exists() and not path.is_file():
        raise ConfigError(f"{path}: not a YAML file (a folder, a device or a FIFO); it must be a text file")
    if not path.is_file():
        raise ConfigError(f"{path}: file not found; --config must name a folder holding params.yaml, schema.yaml and config/config.yaml")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_YAML_BYTES + 1)
        if len(raw) > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_YAML_BYTES // 1000} kB; the configuration files are a few kilobytes")
        data = load_yaml_text(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file (byte {exc.start} is not UTF-8); it must be YAML text") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, found {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- overrides
def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key a user may set, e.g. 'base.seed', 'data_loader.augmentation.rotate90'."""
    keys = []
    for name, tp in _field_types(cls).items():
        if _is_internal(cls, name):
            continue
        dotted = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            keys.extend(all_keys(tp, dotted + "."))
        else:
            keys.append(dotted)
    return keys


def _spec_at(dotted: str) -> tuple[Any, bool] | None:
    """The type of a dotted key and whether it lies inside a free-form dict field."""
    tp: Any = Config
    parts = dotted.split(".")
    for part in parts:
        if dataclasses.is_dataclass(tp):
            types_ = _field_types(tp)
            if part not in types_ or _is_internal(tp, part):
                return None
            tp = types_[part]
        elif typing.get_origin(tp) is dict:
            return typing.get_args(tp)[1], True
        else:
            return None
    return tp, False


def _apply_override(raw: dict[str, Any], origins: dict[str, str], override: str) -> None:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{override}': expected key=value, e.g. train.epochs=5")
    spec = _spec_at(key)
    if spec is None:
        raise ConfigError(f"override {override}: unknown key '{key}'{_suggest(key, all_keys())}")
    tp, _ = spec
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"override {override}: '{key}' is a section; set one of its keys, e.g. {all_keys(tp, key + '.')[0]}=...")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    accepts = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    if str in accepts and not isinstance(value, str) and not (value is None and type(None) in accepts):
        value = text.strip()  # e.g. a sha256 of digits only, which YAML would read as a number
    relative_path = isinstance(value, str) and value and "://" not in value and not os.path.isabs(value)
    if relative_path and _is_pathish(tp, key) and not _is_keyword(key, value):
        value = str((Path.cwd() / value).resolve())
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value
    origins[key] = "command line"


def _is_pathish(tp: Any, dotted: str) -> bool:
    if tp is Path or Path in typing.get_args(tp):
        return True
    return bool(_meta_at(dotted).get("path_like"))


def _is_keyword(dotted: str, value: str) -> bool:
    return value in _meta_at(dotted).get("keywords", ())


def _meta_at(dotted: str) -> dict[str, Any]:
    parent, _, name = dotted.rpartition(".")
    spec = _spec_at(parent) if parent else (Config, False)
    if spec is None or not dataclasses.is_dataclass(spec[0]):
        return {}
    for f in dataclasses.fields(spec[0]):
        if f.name == name:
            return dict(f.metadata)
    return {}


def _suggest(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close:
        last = key.rsplit(".", 1)[-1]
        tails = {c.rsplit(".", 1)[-1]: c for c in candidates}
        near = difflib.get_close_matches(last, list(tails), n=1, cutoff=0.75)
        close = [tails[near[0]]] if near else []
    return f"; did you mean '{close[0]}'?" if close else ""


# ----------------------------------------------------------------------------- validation
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_internal(cls: type, name: str) -> bool:
    return any(f.name == name and f.metadata.get("internal") for f in dataclasses.fields(cls))


def _origin_of(key: str, origins: dict[str, str], within: bool = False) -> str:
    """Which file (or the command line) a key's value came from. With `within`, a value that
    is a whole section counts as from the command line when any key inside it was overridden."""
    if within and any(k.startswith(key + ".") and v == "command line" for k, v in origins.items()):
        return f"command line (over {_origin_of(key, origins)})"
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        label = origins.get(".".join(parts[:i]))
        if label:
            return label
    return "config"


def _describe(tp: Any, meta: dict[str, Any]) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a, meta) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a section with keys " + ", ".join(all_keys(tp))
    if origin is list:
        return "a list of " + _describe(typing.get_args(tp)[0], {}).removeprefix("an ").removeprefix("a ") + " items"
    if origin is dict:
        return f"a mapping of names to {_describe(typing.get_args(tp)[1], {})}"
    base = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}.get(tp, getattr(tp, "__name__", str(tp)))
    bounds = [f"{sym} {meta[k]}" for k, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if k in meta]
    return base + (" " + " and ".join(bounds) if bounds else "")


class _Mismatch(Exception):
    """The value is not of this type (used to try the arms of a Union)."""


def _convert(value: Any, tp: Any, key: str, meta: dict[str, Any], origins: dict[str, str], base_dir: Path, problems: list[str]) -> Any:
    where = f"{_origin_of(key, origins)}: {key}"
    try:
        return _convert_strict(value, tp, key, meta, origins, base_dir, problems)
    except _Mismatch:
        problems.append(f"{where} = {value!r} is not valid; expected {_describe(tp, meta)}")
        return None


def _convert_strict(value: Any, tp: Any, key: str, meta: dict[str, Any], origins: dict[str, str], base_dir: Path, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    where = f"{_origin_of(key, origins)}: {key}"
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where} = {value!r} is not valid; expected a section with keys {', '.join(all_keys(tp))}")
            return None
        kwargs = {}
        types_ = _field_types(tp)
        allowed = [f.name for f in dataclasses.fields(tp) if not f.metadata.get("internal")]
        for name in value:
            if name not in allowed:
                full = [f"{key}.{k}" for k in allowed]
                problems.append(f"{_origin_of(f'{key}.{name}', origins)}: unknown key '{key}.{name}'{_suggest(f'{key}.{name}', full)}")
        for f in dataclasses.fields(tp):
            if f.metadata.get("internal"):
                continue
            if f.name not in value:
                problems.append(f"{where}: missing key '{key}.{f.name}' ({_describe(types_[f.name], dict(f.metadata))})")
                continue
            kwargs[f.name] = _convert(value[f.name], types_[f.name], f"{key}.{f.name}", dict(f.metadata), origins, base_dir, problems)
        if len(kwargs) != len(allowed) or any(v is None and not _allows_none(types_[k]) for k, v in kwargs.items()):
            return None
        obj = tp(**kwargs)
        if hasattr(obj, "check"):
            problems.extend(f"{_origin_of(key, origins, within=True)}: {p}" for p in obj.check(key))
        return obj
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(tp):
            if typing.get_origin(arm) is Literal and value not in typing.get_args(arm):
                continue  # e.g. 'big' for `int | Literal["auto"]`: report the whole union, not just the literal
            if dataclasses.is_dataclass(arm) and not isinstance(value, dict):
                continue  # e.g. 0.5 for `list[float] | RangeParam | None`: the union is reported whole
            trial: list[str] = []
            try:
                result = _convert_strict(value, arm, key, meta, origins, base_dir, trial)
            except _Mismatch:
                continue
            problems.extend(trial)
            return result
        raise _Mismatch
    if origin is Literal:
        if value not in typing.get_args(tp):
            close = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"{where} = {value!r} is not allowed; expected {_describe(tp, meta)}{hint}")
        return value
    if tp is type(None):
        if value is not None:
            raise _Mismatch
        return None
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch
        (item_tp,) = typing.get_args(tp)
        items = [_convert(v, item_tp, f"{key}[{i}]", {}, origins, base_dir, problems) for i, v in enumerate(value)]
        if len(items) < meta.get("min_len", 0):
            problems.append(f"{where} = {value!r} is too short; expected at least {meta['min_len']} items")
        return items
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        _, val_tp = typing.get_args(tp)
        return {str(k): _convert(v, val_tp, f"{key}.{k}", {}, origins, base_dir, problems) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise _Mismatch
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Mismatch
        return _check_range(value, meta, where, problems)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Mismatch
        return _check_range(float(value), meta, where, problems)
    if tp is str:
        if not isinstance(value, str):
            raise _Mismatch
        pattern = meta.get("pattern")
        if pattern:
            import re

            if not re.match(pattern, value):
                problems.append(f"{where} = {value!r} does not match {pattern}")
        if meta.get("path_like") and "://" not in value and value not in meta.get("keywords", ()):
            return str(_resolve(value, base_dir))
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise _Mismatch
        return _resolve(value, base_dir)
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in the spec, not user input


def _allows_none(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def _resolve(value: str, base_dir: Path) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else (base_dir / path).resolve()


def _check_range(value: float, meta: dict[str, Any], where: str, problems: list[str]) -> Any:
    checks = (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"), ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<"))
    for name, ok, sym in checks:
        if name in meta and not ok(value, meta[name]):
            problems.append(f"{where} = {value!r} is out of range; expected {sym} {meta[name]}")
    return value


def dump_yaml(config: Config) -> str:
    """The resolved configuration as YAML (written into every run folder)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
