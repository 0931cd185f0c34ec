"""The configuration's sections: one frozen dataclass per section of the three files, with bounds in field metadata.

`config/config.yaml` says where things live, `params.yaml` how to train (a `base` section
plus one per stage), `schema.yaml` what a dataset must look like.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from metal_defect.config.checking import parse_section
from metal_defect.errors import ConfigError

CONFIG_FILE = "config/config.yaml"
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
    review: Path | None = None  # the review store (null: <artifacts>/review); a container mounts a volume here

    @property
    def tuning_root(self) -> Path:
        return self.tuning or self.artifacts / "tuning"

    @property
    def review_root(self) -> Path:
        return self.review or self.artifacts / "review"


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"]


@dataclass(frozen=True)
class ReviewConfig:
    """The review queue's cap: past it the oldest resolved items go first, and new ones are refused when none is resolved."""

    max_items: int = _f(ge=1, le=10_000_000)
    max_mb: float = _f(gt=0)
    log_rotate_mb: float = _f(gt=0)  # the predictions log (every answer; the history chart reads it) is rotated past this size


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
    reviewed: bool = _f()  # the review store's labelled images join the source (a second source, its own fingerprint)
    review_store: Path | None = field(default=None, metadata={"internal": True})  # paths.review_root, set when loading


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
    class_sampling: Literal["auto", "balanced", "shuffle"] = _f()
    class_sampling_power: float = _f(ge=0, le=1)
    reviewed_share: float = _f(ge=0, lt=1)  # reviewed images repeated until they make up this share of a training epoch
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
    pool_from: Literal["last_block", "all_blocks"] = _f()
    input_normalization: Literal["auto", "dataset", "per_image", "scale"] = _f()
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
    monitor: Literal["val_loss", "val_accuracy", "val_macro_f1"]
    patience: int = _f(ge=1)


@dataclass(frozen=True)
class PlateauParams:
    factor: float = _f(gt=0, lt=1)
    patience: int = _f(ge=1)
    min_lr: float = _f(ge=0)


@dataclass(frozen=True)
class CallbacksParams:
    checkpoint_monitor: Literal["val_loss", "val_accuracy", "val_macro_f1"]
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
    regularisation_ramp: float = _f(ge=0, le=1)  # the share of augmentation and dropout moves by 1/(this x epochs) per epoch (0: full)
    fit_target: float = _f(gt=0, le=1)  # ...up after an epoch whose training accuracy reached this, down after one that did not
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
    masks: str | None = _f(path_like=True)

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
    "brightness": (0.0, 1.0), "contrast": (0.0, 1.0), "noise_std": (0.0, 1.0), "resample_blur": (0.0, 0.95), "fine_tune_layers": (0, 10000),
    "label_smoothing": (0.0, 0.5), "weight_decay": (0.0, 0.1), "class_weight_power": (0.0, 1.0)}


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
    label_smoothing: Choices = None     # train.*: the loss and optimizer regularisers
    weight_decay: Choices = None
    class_weight_power: Choices = None  # train.class_weight_power (0: unweighted, 1: fully balanced), when class weights are on
    input_normalization: list[Literal["dataset", "per_image", "scale"]] | None = None  # model.custom_cnn.input_normalization

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
    """c07: a Keras Tuner search around the best base model, then its best configuration trained with the full schedule."""

    enabled: bool | Literal["auto"]  # auto: only when the base model leaves room (flagged weak, or validation below gate_good_macro_f1)
    model: str = _f(keywords=("best",))   # best (the best base model of evaluation) or a name in train.models
    tuner: Literal["random", "bayesian", "hyperband"] = _f()
    max_trials: int = _f(ge=1, le=10000)
    epochs_per_trial: int = _f(ge=1)
    objective: Literal["val_loss", "val_accuracy", "val_macro_f1"] = _f()
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
    review: ReviewConfig
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
    "review": "config.yaml",
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
