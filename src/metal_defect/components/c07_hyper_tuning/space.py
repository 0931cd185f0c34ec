"""c07 search space: which hyperparameters a search declares, and where a trial's values go in the recipe."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from metal_defect import artifacts as art
from metal_defect.components.c04_model_builder import CUSTOM
from metal_defect.config import RangeParam, Recipe, TuningParams, fingerprint_of, to_plain
from metal_defect.errors import ArtifactError

INT_KEYS = ("batch_size", "blocks", "convs_per_block", "dense_units", "fine_tune_layers")
CNN_ONLY = ("blocks", "width", "convs_per_block", "pooling", "input_scale", "input_normalization")
TRANSFER_ONLY = ("fine_tune_layers",)
AUGMENTATION_KEYS = ("rotation_degrees", "brightness", "contrast", "noise_std", "resample_blur")
TRAIN_KEYS = ("learning_rate", "label_smoothing", "weight_decay", "class_weight_power")
MAX_FILTERS = 512


def searched_entries(tuning: TuningParams, model_name: str) -> dict[str, Any]:
    """The space entries that apply to `model_name` (custom-CNN keys only for custom_cnn, ...)."""
    skip = TRANSFER_ONLY if model_name == CUSTOM else CNN_ONLY
    return {name: entry for name, entry in tuning.space.searched().items() if name not in skip}


def declare_space(hp: Any, tuning: TuningParams, model_name: str) -> None:
    """Register the searched entries as Keras Tuner hyperparameters."""
    for name, entry in searched_entries(tuning, model_name).items():
        if isinstance(entry, RangeParam):
            hp.Float(name, entry.min, entry.max, sampling="log" if entry.log else "linear")
        elif name in INT_KEYS:
            hp.Choice(name, sorted({int(v) for v in entry}))
        elif name in ("pooling", "input_normalization"):
            hp.Choice(name, list(dict.fromkeys(entry)))
        else:
            hp.Choice(name, sorted({float(v) for v in entry}))


def scaled_filters(filters: list[int], blocks: int | None, width: float | None) -> list[int]:
    """`filters` cut or extended to `blocks` (an extra block doubles the last, capped at 512), times `width`
    (rounded to a multiple of 8, at least 8)."""
    filters = list(filters)
    if blocks is not None:
        extra = [min(filters[-1] * 2**i, MAX_FILTERS) for i in range(1, max(blocks - len(filters), 0) + 1)]
        filters = (filters + extra)[:blocks]
    if width is not None:
        filters = [max(8, round(f * width / 8) * 8) for f in filters]
    return filters


def apply_hyperparameters(recipe: Recipe, values: Mapping[str, Any]) -> Recipe:
    """The recipe with a trial's values written where they belong (train, data_loader, model): what a trial trains,
    and what the finalist is trained with."""
    values = {k: v for k, v in values.items() if not k.startswith("tuner/")}
    cnn = recipe.model.custom_cnn
    filters = scaled_filters(cnn.filters, values.get("blocks"), values.get("width"))
    cnn_keys = ("convs_per_block", "pooling", "dropout", "dense_units", "input_scale", "input_normalization")
    cnn = dataclasses.replace(cnn, filters=filters, **{k: values[k] for k in cnn_keys if k in values})
    transfer = dataclasses.replace(recipe.model.transfer, **{k: values[k] for k in ("dropout", "dense_units", "fine_tune_layers") if k in values})
    augmentation = dataclasses.replace(recipe.data_loader.augmentation, **{k: float(values[k]) for k in AUGMENTATION_KEYS if k in values})
    loader = dataclasses.replace(recipe.data_loader, batch_size=int(values.get("batch_size", recipe.data_loader.batch_size)), augmentation=augmentation)
    train = dataclasses.replace(recipe.train, **{k: float(values[k]) for k in TRAIN_KEYS if k in values})
    return dataclasses.replace(recipe, data_loader=loader, model=dataclasses.replace(recipe.model, custom_cnn=cnn, transfer=transfer), train=train)


def recipe_point(recipe: Recipe, tuning: TuningParams, model_name: str, input_normalization: str) -> dict[str, Any] | None:
    """The recipe itself as a point of the search space: its own value under every searched name, or None when one of
    them lies outside the space (then no trial trains exactly the recipe). `input_normalization` is the mode the
    recipe's `auto` resolved to on this data.

    Keras Tuner starts from random points, not from the hyperparameters' defaults; a search whose first trial is the
    recipe ranks every candidate against it at the same short budget, and knows when nothing beat it."""
    cnn, transfer, train, augmentation = recipe.model.custom_cnn, recipe.model.transfer, recipe.train, recipe.data_loader.augmentation
    normalization = input_normalization if cnn.input_normalization == "auto" else cnn.input_normalization
    head = cnn if model_name == CUSTOM else transfer
    own = {"learning_rate": train.learning_rate, "batch_size": recipe.data_loader.batch_size, "blocks": len(cnn.filters), "width": 1.0,
           "convs_per_block": cnn.convs_per_block, "pooling": cnn.pooling, "dropout": head.dropout, "dense_units": head.dense_units,
           "input_scale": cnn.input_scale, "input_normalization": normalization, "label_smoothing": train.label_smoothing,
           "weight_decay": train.weight_decay, "class_weight_power": train.class_weight_power, "fine_tune_layers": transfer.fine_tune_layers,
           **{k: getattr(augmentation, k) for k in AUGMENTATION_KEYS}}
    point: dict[str, Any] = {}
    for name, entry in searched_entries(tuning, model_name).items():
        value = own.get(name)
        if isinstance(entry, RangeParam):
            inside = value is not None and entry.min <= value <= entry.max
        else:  # the value as declare_space declared it (ints, floats, or strings)
            declared = [int(v) for v in entry] if name in INT_KEYS else list(entry) if name in ("pooling", "input_normalization") else [float(v) for v in entry]
            inside = value in declared
            value = declared[declared.index(value)] if inside else value
        if not inside:
            return None
        point[name] = value
    resolved = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, custom_cnn=dataclasses.replace(cnn, input_normalization=normalization)))
    applied = apply_hyperparameters(resolved, point)

    def trained(r: Recipe) -> tuple[Any, ...]:  # what the trial of `model_name` trains with
        return r.train, r.data_loader, r.model.custom_cnn if model_name == CUSTOM else r.model.transfer

    # filters that are not multiples of 8 would be rounded by `width`: then the point is a neighbour, not the recipe
    return point if trained(applied) == trained(resolved) else None


def bayesian_initial_points(tuning: TuningParams) -> int:
    """Random trials before the Bayesian oracle's Gaussian process proposes: half of max_trials, at least 2."""
    return max(2, tuning.max_trials // 2)


@dataclasses.dataclass(frozen=True)
class SearchJob:
    """One search: which model, which recipe and settings, on which prepared data."""

    model_name: str
    recipe: Recipe
    tuning: TuningParams
    prepared: Path
    data_fingerprint: str

    @property
    def recipe_fingerprint(self) -> str:
        """Covers everything that changes what a trial computes or which trials the oracle proposes (not the
        budget, not `enabled`). The oracle's settings derived in code count too: a resumed Keras Tuner project
        keeps the ones it was created with, so a search made before the Bayesian oracle's random start was
        halved would have resumed with its 27 random draws."""
        tuning = {k: v for k, v in to_plain(self.tuning).items() if k not in ("enabled", "max_minutes", "model")}
        oracle = {"num_initial_points": bayesian_initial_points(self.tuning)} if self.tuning.tuner == "bayesian" else {}
        if self.tuning.tuner != "hyperband":
            oracle["first_trial"] = "the recipe"  # since 2026-12-07: an older project never tried it
        return fingerprint_of({"model": self.model_name, "tuning": tuning, "recipe": to_plain(self.recipe), "oracle": oracle})[:16]

    @property
    def key(self) -> str:
        """The project folder name: a changed space, recipe or data starts a new search."""
        return f"{self.model_name}-{fingerprint_of([self.recipe_fingerprint, self.data_fingerprint])[:12]}"


def data_fingerprint(prepared: Path) -> str:
    """The content hash c02's finished output was recorded with (the same on every machine for the same data)."""
    record = Path(prepared) / art.STAGE_RECORD
    if not record.is_file():
        raise ArtifactError(f"{prepared}: no finished-stage record; prepare the data with `python main.py run --stages data_preprocessing`")
    return str(art.read_json(record)["output_hash"])


def shown_values(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if not k.startswith("tuner/")}


def format_values(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown_values(values).items()) or "defaults"


def space_text(job: SearchJob) -> str:
    entries = searched_entries(job.tuning, job.model_name)
    shown = [f"{k} {v.min:g}..{v.max:g}{' (log)' if v.log else ''}" if isinstance(v, RangeParam) else f"{k} {v}" for k, v in entries.items()]
    return "space: " + ("; ".join(shown) or "empty (one trial of the recipe as it is)")
