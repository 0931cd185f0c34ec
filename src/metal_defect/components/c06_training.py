"""c06 training stage: train every base model listed in `train.models`.

Custom CNN and randomly initialised backbones train end to end. Backbones with pretrained
weights train in two phases, as the Keras transfer-learning guide does: the frozen base
(called with training=False) under a new head, then the top layers unfrozen at a low
learning rate with BatchNorm kept frozen, recompiled. Each model's partial state lives in
the stage's work folder, so an interrupted run resumes at the last finished epoch of the
model and phase it was in; finished models are not trained again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import statistics
import time
import zipfile
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from PIL import Image
from sklearn.utils.class_weight import compute_class_weight

from metal_defect.artifacts import read_json, write_json_atomic
from metal_defect.components import c04_model_builder as builder
from metal_defect.components.c03_dataset_loader import IMBALANCE_FOR_AUTO, Datasets, imbalance_ratio
from metal_defect.components.c05_callbacks import (
    BEST_CHECKPOINT,
    HISTORY_CSV,
    DeadlineStop,
    adaptive_regularisation,
    learning_rate,
    make_callbacks,
    ramp_epochs,
    read_history,
)
from metal_defect.config import BaseParams, CallbacksParams, ModelParams, TrainParams
from metal_defect.serving.keras_objects import SparseSmoothedCrossentropy

log = logging.getLogger(__name__)

MODELS_DIR = "models"
# the train stage's file per model; a bundle's own model file (serving.bundle.MODEL_FILE) is another contract
TRAINED_MODEL = "model.keras"
HISTORY_FILE = "history.json"  # per-epoch metrics and seconds of one model's fit
TRAIN_SUMMARY = "train_summary.json"
SUMMARIES_FILE = "model_summaries.txt"
PHASE_DONE = "phase_done"  # in a phase's work folder: the phase finished (a resumed run loads its best epoch)
DONE_FILE = "done.json"  # in a model's work folder: its training finished (what a resumed run skips)
SUMMARY_TEXT = "summary.txt"  # in a model's work folder: its Keras summary, gathered into SUMMARIES_FILE


def train_models(data: Datasets, base: BaseParams, model_params: ModelParams, callback_params: CallbacksParams, train: TrainParams,
                 work_dir: Path, out_dir: Path, saved_suffix: str = "", deadline: float | None = None) -> dict[str, Any]:
    """Train (or pick up finished) models; copy each into out_dir/models/<name><saved_suffix>/.

    `deadline` (time.time()): no epoch starts after it (the tuning stage's finalist keeps to its budget).
    """
    summaries: dict[str, Any] = {}
    texts = []
    for name in train.models:
        model_work = work_dir / name
        done = model_work / DONE_FILE
        discard_unreadable_state(model_work)
        if done.is_file():
            log.info("%s: already trained in an earlier attempt of this stage; not training again", name)
            info = read_json(done)
        else:
            info = train_one(name, data, base, model_params, callback_params, train, model_work, deadline)
            write_json_atomic(done, info)
        target = out_dir / MODELS_DIR / (name + saved_suffix)
        target.mkdir(parents=True)
        shutil.copy2(model_work / TRAINED_MODEL, target / TRAINED_MODEL)
        for extra in (HISTORY_CSV, HISTORY_FILE):
            if (model_work / extra).is_file():
                shutil.copy2(model_work / extra, target / extra)
        for board in sorted(model_work.glob("*/tensorboard")):
            shutil.copytree(board, target / "tensorboard" / board.parent.name)
        texts.append((model_work / SUMMARY_TEXT).read_text())
        summaries[name + saved_suffix] = info | {"name": name + saved_suffix}
    (out_dir / SUMMARIES_FILE).write_text("\n\n".join(texts), encoding="utf-8")
    write_json_atomic(out_dir / TRAIN_SUMMARY, {"models": summaries, "class_names": data.class_names, "image_shape": list(data.image_shape)})
    return {"models": {n: {k: s[k] for k in ("pretrained", "schedule", "epochs_run", "best_val_loss", "median_epoch_seconds")} for n, s in summaries.items()}}


def schedule_epochs(train: TrainParams, steps_per_epoch: int) -> int:
    """train.epochs, raised so that training takes at least train.min_steps optimizer steps.

    A small data set gives few steps per epoch; 40 epochs of 15 steps leave a CNN far from
    fitting its training split, while the same 40 epochs are plenty at 40 steps.
    """
    return max(train.epochs, math.ceil(train.min_steps / max(steps_per_epoch, 1)))


def epochs_for(train: TrainParams, steps_per_epoch: int) -> int:
    """`schedule_epochs`, saying so in the log when min_steps raised them."""
    epochs = schedule_epochs(train, steps_per_epoch)
    if epochs > train.epochs:
        log.info("%d steps per epoch: training %d epochs instead of %d to reach train.min_steps (%d)", steps_per_epoch, epochs,
                 train.epochs, train.min_steps)
    return epochs


def scaled_patience(params: CallbacksParams, epochs: int, configured_epochs: int) -> CallbacksParams:
    """Early-stopping patience stretched by the factor min_steps stretched the epochs: the same
    share of the schedule, not the same number of (now much shorter) epochs."""
    if epochs <= configured_epochs:
        return params
    patience = math.ceil(params.early_stopping.patience * epochs / configured_epochs)
    return dataclasses.replace(params, early_stopping=dataclasses.replace(params.early_stopping, patience=patience))


def fit_callbacks(train: TrainParams, callback_params: CallbacksParams, epochs: int, phase_work: Path, data: Any,
                  checkpoint: bool = True, monitors: tuple[str, ...] = ()) -> list[Any]:
    """The callbacks of one training phase of `epochs` epochs: c05's, with early stopping waiting out the
    regularisation ramp, and the adaptive regularisation first (the CSV logger then records each epoch's share).
    A tuning trial uses the same ones (`checkpoint=False`, its objective in `monitors`): trial and train stage
    cannot drift apart."""
    callbacks = make_callbacks(scaled_patience(callback_params, epochs, train.epochs), phase_work, checkpoint=checkpoint,
                               validation=data["valid"].dataset, monitors=monitors, settle_epochs=ramp_epochs(train, epochs))
    return adaptive_regularisation(train, data["train"], epochs, read_history(phase_work / HISTORY_CSV)) + callbacks


def readable_state_file(path: Path) -> bool:
    """Whether a saved model (.keras zip) or weights file (.h5) can be read to the end."""
    try:
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as archive:
                return archive.testzip() is None
        if path.suffix == ".h5":
            import h5py

            with h5py.File(path, "r") as handle:
                handle.visit(lambda _: None)
            return True
    except Exception:  # any failure to read means: not usable (h5py and zipfile raise many kinds)
        return False
    return path.is_file()


def discard_unreadable_state(model_work: Path) -> None:
    """Drop partial training state that cannot be read, keeping every part that can.

    A finished model whose file is damaged is rebuilt from its finished phases; a phase whose
    best checkpoint or every backup file is damaged starts again from scratch. Each discard
    is reported; nothing unreadable is handed to Keras (which would stop every rerun).
    """
    if not model_work.is_dir():
        return
    done = model_work / DONE_FILE
    if done.is_file() and not readable_state_file(model_work / TRAINED_MODEL):
        log.warning("%s: saved model %s is unreadable; discarding it and rebuilding it from the finished phases", model_work.name, model_work / TRAINED_MODEL)
        done.unlink()
        (model_work / TRAINED_MODEL).unlink(missing_ok=True)
    for phase_work in sorted(p for p in model_work.iterdir() if p.is_dir()):
        checkpoint = phase_work / BEST_CHECKPOINT
        backups = sorted((phase_work / "backup").glob("*.weights.h5"))
        if (phase_work / PHASE_DONE).is_file():
            broken = [] if readable_state_file(checkpoint) else [checkpoint]
        else:
            unreadable = [b for b in backups if not readable_state_file(b)]
            broken = unreadable if backups and len(unreadable) == len(backups) else []
            if checkpoint.exists() and not readable_state_file(checkpoint):
                broken.append(checkpoint)
        if broken:
            log.warning("%s: partial training state unreadable (%s); discarding phase '%s' and training it again from scratch",
                        model_work.name, ", ".join(str(b.relative_to(model_work)) for b in broken), phase_work.name)
            shutil.rmtree(phase_work)


def make_strategy(kind: str) -> Any:
    """MirroredStrategy over all local GPUs (auto: when there are two or more), else the default."""
    gpus = tf.config.list_logical_devices("GPU")
    if kind == "mirrored" or (kind == "auto" and len(gpus) > 1):
        strategy = tf.distribute.MirroredStrategy()
        log.info("MirroredStrategy over %d replica(s): %s", strategy.num_replicas_in_sync, [d.name for d in gpus] or ["CPU"])
        return strategy
    return tf.distribute.get_strategy()


def image_statistics(files: list[Path]) -> np.ndarray:
    """Each image's pixel mean, std and pixel count on a 0..1 scale, [N, 3] (one read of the training split)."""
    rows = np.zeros((len(files), 3))
    for i, path in enumerate(files):
        arr = np.asarray(Image.open(path), dtype=np.float64) / 255.0
        rows[i] = arr.mean(), arr.std(), arr.size
    return rows


def pooled_statistics(per_image: np.ndarray) -> tuple[float, float]:
    """Mean and std of all the pixels of images with these image_statistics (0..1 scale)."""
    if len(per_image) == 0:
        return 0.0, 1.0
    weights = per_image[:, 2] / per_image[:, 2].sum()
    mean = float(weights @ per_image[:, 0])
    second_moment = float(weights @ (np.square(per_image[:, 1]) + np.square(per_image[:, 0])))
    return mean, float(np.sqrt(max(second_moment - mean**2, 1e-12)))


def pixel_statistics(files: list[Path]) -> tuple[float, float]:
    """Mean and std of training pixels on a 0..1 scale (stored inside the model)."""
    return pooled_statistics(image_statistics(files))


# Below this share of the way from chance to a perfect answer, an image's overall brightness and contrast are
# taken to tell nothing of its class (the shared sets' training splits: magnetic tiles 0.001-0.006, X-SDD 0.23,
# the proxy 0.24, NEU 0.63-0.66)
BRIGHTNESS_UNINFORMATIVE = 0.1
BRIGHTNESS_IMAGES_PER_CLASS = 1000  # the decision reads at most this many images of a class: bounded time on any set


def brightness_information(per_image: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """How much of an image's class its overall brightness and contrast (pixel mean and std) give away: the
    cross-validated balanced accuracy of a small random forest on those two numbers, as a share of the way from
    chance (0) to perfect (1). 1.0 when it cannot be measured (one class, or a class with a single image)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:BRIGHTNESS_IMAGES_PER_CLASS] for c in np.unique(labels)]
                          ) if len(labels) else np.zeros(0, int)
    keep = np.sort(keep)
    per_image, labels = per_image[keep], labels[keep]  # balanced accuracy does not depend on class shares
    classes, counts = np.unique(labels, return_counts=True)
    folds = int(min(5, counts.min())) if len(classes) else 0
    if len(classes) < 2 or folds < 2:
        return 1.0
    forest = RandomForestClassifier(n_estimators=100, min_samples_leaf=5, random_state=seed, n_jobs=1)
    predicted = cross_val_predict(forest, per_image[:, :2], labels, cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    chance = 1.0 / len(classes)
    return float((balanced_accuracy_score(labels, predicted) - chance) / (1.0 - chance))


def input_normalization(setting: str, per_image: np.ndarray, labels: np.ndarray) -> tuple[str, dict[str, Any]]:
    """model.custom_cnn.input_normalization, with `auto` decided on the training split: each image standardised
    (per_image) when its brightness and contrast tell nothing of its class, else the training split's statistics
    (dataset). Returns the mode and what it was decided from (for the log and train_summary.json).

    Why: magnetic tiles were photographed in six exposure batches (mean grey 67 to 153, the pixel std growing
    with it): a gain the network had to learn six times over, and most of its errors were in the darkest and
    brightest batches. Standardising each image removes a gain exactly; on NEU, where brightness and contrast
    carry much of the class (inclusion is dark and flat, pitted surface bright), it would throw that away."""
    if setting != "auto":
        return setting, {"mode": setting, "setting": setting}
    information = brightness_information(per_image, labels)
    mode = "per_image" if information < BRIGHTNESS_UNINFORMATIVE else "dataset"
    log.info("input normalisation (auto): an image's brightness and contrast alone take a classifier %.3f of the way from chance "
             "to its class (below %.2f: a nuisance of the acquisition); %s", information, BRIGHTNESS_UNINFORMATIVE,
             "each image standardised (per_image)" if mode == "per_image" else "the training split's statistics (dataset)")
    return mode, {"mode": mode, "setting": setting, "brightness_information": round(information, 4)}


def training_input(files: list[Path], labels: np.ndarray, setting: str) -> tuple[tuple[float, float], str, dict[str, Any]]:
    """One read of the training split: the pixel statistics stored in the model, and the custom CNN's input
    normalisation decided from `setting` (with its record), for the train stage and the tuning trials alike."""
    per_image = image_statistics(files)
    mode, record = input_normalization(setting, per_image, labels)
    return pooled_statistics(per_image), mode, record


def with_input_normalization(model_params: ModelParams, mode: str) -> ModelParams:
    """`model_params` with the custom CNN's input normalisation set to a decided mode."""
    return dataclasses.replace(model_params, custom_cnn=dataclasses.replace(model_params.custom_cnn, input_normalization=mode))


def use_class_weights(setting: bool | str, labels: np.ndarray, balanced_draws: bool = False) -> bool:
    """train.class_weights: true/false as given; auto when the training split is imbalanced and its
    batches are not already drawn class-balanced (data_loader.class_sampling): both would count twice."""
    if setting != "auto":
        return bool(setting)
    ratio = imbalance_ratio(labels)
    use = ratio > IMBALANCE_FOR_AUTO and not balanced_draws
    log.info("class balance: largest/smallest class %.2fx; %s", ratio,
             "balanced class weights on" if use else "batches drawn class-balanced, no class weights" if balanced_draws else "no class weights needed")
    return use


def training_class_weights(train: TrainParams, labels: np.ndarray, n_classes: int, balanced_draws: bool) -> dict[int, float] | None:
    """The loss weights the fit uses (None: unweighted), for the train stage and the tuning trials alike."""
    return class_weights(labels, n_classes, train.class_weight_power) if use_class_weights(train.class_weights, labels, balanced_draws) else None


def class_weights(labels: np.ndarray, n_classes: int, power: float = 1.0) -> dict[int, float]:
    """Balanced class weights (n / (k * count)) raised to `power`: 1 balances fully, 0.5 goes halfway (in log terms)."""
    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels) ** power
    return {int(c): float(w) for c, w in zip(present, weights)} | {c: 1.0 for c in range(n_classes) if c not in present}


def _optimizer(train: TrainParams, lr: Any) -> keras.optimizers.Optimizer:
    if train.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=train.weight_decay)
    if train.optimizer == "adam":
        return keras.optimizers.Adam(lr)
    return keras.optimizers.SGD(lr, momentum=0.9, nesterov=True, weight_decay=train.weight_decay or None)


def compile_model(model: keras.Model, train: TrainParams, lr: Any) -> None:
    """Compile with keyword arguments (a positional metrics list would become loss weights)."""
    model.compile(optimizer=_optimizer(train, lr), loss=SparseSmoothedCrossentropy(train.label_smoothing), metrics=["accuracy"])


def train_one(name: str, data: Datasets, base: BaseParams, model_params: ModelParams, callback_params: CallbacksParams,
              train: TrainParams, model_work: Path, deadline: float | None = None) -> dict[str, Any]:
    """Build and fit one model; save its best-epoch weights as model_work/model.keras (no epoch starts after `deadline`)."""
    keras.utils.set_random_seed(base.seed)
    if base.deterministic_ops:
        tf.config.experimental.enable_op_determinism()
    gpus = tf.config.list_logical_devices("GPU")
    policy = keras.mixed_precision.global_policy().name
    if train.mixed_precision:
        if gpus:
            keras.mixed_precision.set_global_policy("mixed_float16")
        else:
            log.warning("train.mixed_precision is on but there is no GPU: training in float32")
    try:
        strategy = make_strategy(train.strategy)
        custom = name == builder.CUSTOM  # only the custom CNN's normalisation is decided (a backbone brings its own)
        stats, normalization, decided = training_input(data["train"].files, data["train"].labels,
                                                       model_params.custom_cnn.input_normalization if custom else "dataset")
        if custom:
            model_params = with_input_normalization(model_params, normalization)
        with strategy.scope():
            built = builder.build_model(name, data.image_shape, len(data.class_names), model_params, stats)
        model_work.mkdir(parents=True, exist_ok=True)
        (model_work / SUMMARY_TEXT).write_text(f"== {name} ({'pretrained ' + built.weights if built.pretrained else 'random init'}, "
                                               f"{built.schedule}) ==\n{builder.summary_text(built.model)}", encoding="utf-8")
        weights = training_class_weights(train, data["train"].labels, len(data.class_names), data["train"].balanced)
        steps = data.steps("train")
        if built.schedule == "two_phase":
            t = model_params.transfer
            phases = [("head", epochs_for(train, steps), train.learning_rate), ("fine_tune", t.fine_tune_epochs, t.fine_tune_learning_rate)]
        else:
            phases = [("end_to_end", epochs_for(train, steps), train.learning_rate)]
        started = time.perf_counter()
        history: list[dict[str, float]] = []
        for phase, epochs, base_lr in phases:
            if epochs == 0:
                continue
            phase_work = model_work / phase
            with strategy.scope():
                if phase == "head":
                    builder.freeze_backbone(built)
                elif phase == "fine_tune":
                    unfrozen = builder.unfreeze_top(built, model_params.transfer.fine_tune_layers)
                    log.info("%s: fine-tuning the top %d backbone layers with weights (BatchNorm frozen)", name, unfrozen)
                compile_model(built.model, train, learning_rate(callback_params, base_lr, steps, epochs))
            if (phase_work / PHASE_DONE).is_file():
                built.model.load_weights(phase_work / BEST_CHECKPOINT)
                history += _tag(read_history(phase_work / HISTORY_CSV), phase, len(history))
                continue
            log.info("%s: phase %s, %d epochs at learning rate %g, %d steps/epoch", name, phase, epochs, base_lr, steps)
            callbacks = fit_callbacks(train, callback_params, epochs, phase_work, data)
            if deadline is not None:
                callbacks.insert(0, DeadlineStop(deadline))
            fit = built.model.fit(data["train"].dataset, validation_data=data["valid"].dataset, epochs=epochs,
                                  callbacks=callbacks,
                                  class_weight=weights, verbose=train.verbose,
                                  shuffle=False)  # the tf.data pipeline shuffles
            if (phase_work / BEST_CHECKPOINT).is_file():
                built.model.load_weights(phase_work / BEST_CHECKPOINT)  # the best epoch, not the last
            rows = read_history(phase_work / HISTORY_CSV) or _rows(fit.history)
            history += _tag(rows, phase, len(history))
            (phase_work / PHASE_DONE).write_text("")
        built.model.save(model_work / TRAINED_MODEL)
        (model_work / HISTORY_FILE).write_text(json.dumps(history, indent=1))
        seconds = [row["epoch_seconds"] for row in history[1:] if "epoch_seconds" in row]
        val_losses = [row["val_loss"] for row in history if "val_loss" in row]
        return {
            "name": name, "pretrained": built.pretrained, "weights": built.weights, "schedule": built.schedule,
            "phases": [p for p, e, _ in phases if e], "epochs_run": len(history),
            "best_val_loss": round(min(val_losses), 5) if val_losses else None,
            "median_epoch_seconds": round(statistics.median(seconds), 3) if seconds else None,
            "train_seconds_this_attempt": round(time.perf_counter() - started, 1),
            "parameters": builder.parameter_counts(built.model), "pixel_statistics": stats,
            "input_normalization": decided if custom else None,
            "strategy": "MirroredStrategy" if isinstance(strategy, tf.distribute.MirroredStrategy) else "default (one device)", "replicas": strategy.num_replicas_in_sync,
            "class_weights": weights, "mixed_precision": keras.mixed_precision.global_policy().name,
        }
    finally:
        keras.mixed_precision.set_global_policy(policy)


def _rows(history: dict[str, list[float]]) -> list[dict[str, float]]:
    keys = list(history)
    return [{"epoch": i, **{k: float(history[k][i]) for k in keys}} for i in range(len(history[keys[0]]))] if keys else []


def _tag(rows: list[dict[str, Any]], phase: str, offset: int) -> list[dict[str, Any]]:
    return [{**row, "phase": phase, "global_epoch": offset + i + 1} for i, row in enumerate(rows)]
