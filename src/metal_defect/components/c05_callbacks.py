"""c05 callbacks and learning-rate schedules, from params.

Everything that must survive an interruption lives in the training stage's work folder:
BackupAndRestore state (weights, optimizer, epoch), the best checkpoint and the CSV log.
Running the same command again resumes at the last finished epoch, and the best-so-far
threshold is restored from the CSV log so the checkpoint keeps the true best epoch.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Any

import keras

from metal_defect.config import CallbacksParams

log = logging.getLogger(__name__)

HISTORY_CSV = "history.csv"
BEST_CHECKPOINT = "best.keras"
VAL_MACRO_F1 = "val_macro_f1"  # a monitor no Keras metric gives: ValidationMacroF1 adds it to the epoch logs


class EpochTimer(keras.callbacks.Callback):
    """Records wall-clock seconds per epoch into the logs (column `epoch_seconds`)."""

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["epoch_seconds"] = time.perf_counter() - self._start


class ValidationMacroF1(keras.callbacks.Callback):
    """Adds the macro F1 on the validation split to the epoch logs (column `val_macro_f1`).

    On imbalanced data val_loss and val_accuracy favour the majority class: a model that answers
    the largest class for everything scores well on both. Macro F1 weighs every class equally,
    as evaluation's select_metric does. One extra pass over the validation images per epoch."""

    def __init__(self, dataset: Any):
        super().__init__()
        self.dataset = dataset  # batches of (images, int labels)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        import numpy as np
        from sklearn.metrics import f1_score

        truth, predicted = [], []
        for images, labels in self.dataset:
            truth.append(np.asarray(labels))
            predicted.append(np.argmax(keras.ops.convert_to_numpy(self.model(images, training=False)), axis=1))
        if logs is not None and truth:
            logs[VAL_MACRO_F1] = float(f1_score(np.concatenate(truth), np.concatenate(predicted), average="macro", zero_division=0))


class LearningRateLogger(keras.callbacks.Callback):
    """Adds the optimizer's current learning rate to the epoch logs (column `learning_rate`)."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


def learning_rate(params: CallbacksParams, base_lr: float, steps_per_epoch: int, epochs: int) -> Any:
    """A float (constant/plateau) or a warm-up + cosine schedule over the whole run."""
    if params.lr_schedule != "cosine":
        return base_lr
    total = max(steps_per_epoch * epochs, 1)
    warmup = min(params.warmup_epochs * steps_per_epoch, total - 1)
    if warmup > 0:
        return keras.optimizers.schedules.CosineDecay(base_lr * 0.1, decay_steps=total - warmup, warmup_target=base_lr, warmup_steps=warmup)
    return keras.optimizers.schedules.CosineDecay(base_lr, decay_steps=total)


def monitor_mode(monitor: str) -> str:
    """'max' for an accuracy or an F1 score, 'min' for a loss: the direction in which `monitor` improves."""
    return "max" if "acc" in monitor or "f1" in monitor else "min"


def best_of(values: list[float], monitor: str) -> float | None:
    """The best of `values` of `monitor` (None for none)."""
    if not values:
        return None
    return max(values) if monitor_mode(monitor) == "max" else min(values)


def best_so_far(csv_path: Path, monitor: str) -> float | None:
    """The best value of `monitor` in an existing CSV log (None when there is none)."""
    rows = read_history(csv_path)
    return best_of([row[monitor] for row in rows if monitor in row], monitor)


def read_history(csv_path: Path) -> list[dict[str, float]]:
    """CSVLogger rows as floats, one per epoch (a row repeated by a resume keeps the last)."""
    if not csv_path.is_file():
        return []
    by_epoch: dict[int, dict[str, float]] = {}
    with open(csv_path, newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                values = {k: float(v) for k, v in row.items() if k and v not in ("", None)}
            except ValueError:
                continue
            if "epoch" in values:
                by_epoch[int(values["epoch"])] = values
    return [by_epoch[e] for e in sorted(by_epoch)]


class AdaptiveRegularisation(keras.callbacks.Callback):
    """Adaptive regularisation (train.regularisation_ramp, train.fit_target): one share (0..1) scales how many
    training images are augmented and the head's dropout rate. It starts at `initial` (0 for a new fit) and moves
    by `step` after every epoch: up when that epoch's training accuracy reached `fit_target`, down when it did not.

    Why: on magnetic tiles, with augmentation and dropout from the first epoch the network stayed at the majority
    answer (it fitted 0.71 of its training images); without them it fitted 0.99. As much regularisation as the
    network can still fit (the feedback of adaptive discriminator augmentation, Karras et al. 2020; weak
    regularisation first, as in EfficientNetV2's progressive learning) lets an easy data set reach full strength
    within a few epochs and a hard one fit first. The share is logged as `regularisation_share`, so a resumed
    fit goes on from the last one."""

    def __init__(self, augmented_share: Any, step: float, fit_target: float, initial: float = 0.0):
        super().__init__()
        self.augmented_share, self.step, self.fit_target, self.current = augmented_share, step, fit_target, float(initial)

    def _apply(self) -> None:
        if self.augmented_share is not None:
            self.augmented_share.assign(self.current)
        for layer in scheduled_dropouts(self.model):
            layer.share.assign(self.current)

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._apply()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        accuracy = (logs or {}).get("accuracy")
        if accuracy is not None:
            self.current = min(1.0, max(0.0, self.current + (self.step if accuracy >= self.fit_target else -self.step)))
            self._apply()
        if logs is not None:
            logs[REGULARISATION_SHARE] = self.current  # the share the next epoch uses

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.augmented_share is not None:  # the split's pipeline as built: every image augmented
            self.augmented_share.assign(1.0)


REGULARISATION_SHARE = "regularisation_share"


def scheduled_dropouts(model: Any) -> list[Any]:
    """The model's ScheduledDropout layers, nested models included."""
    from metal_defect.serving.keras_objects import ScheduledDropout

    found = []
    for layer in getattr(model, "layers", []):
        if isinstance(layer, ScheduledDropout):
            found.append(layer)
        elif isinstance(layer, keras.Model):
            found += scheduled_dropouts(layer)
    return found


def ramp_epochs(train: Any, epochs: int) -> int:
    """Epochs the adaptive regularisation needs at least to reach full strength in a fit of `epochs` (0: no ramp)."""
    return math.ceil(train.regularisation_ramp * epochs) if train.regularisation_ramp > 0 else 0


def adaptive_regularisation(train: Any, train_split: Any, epochs: int, history: list[dict[str, Any]] | None = None
                            ) -> list[keras.callbacks.Callback]:
    """The AdaptiveRegularisation of a fit of `epochs` epochs (train: the TrainParams; train_split: the c03
    SplitData), or none (regularisation_ramp 0: full strength from the first epoch). `history`: the rows of an
    interrupted fit, whose last share it goes on from."""
    if train.regularisation_ramp <= 0:
        return []
    shares = [row[REGULARISATION_SHARE] for row in history or [] if REGULARISATION_SHARE in row]
    step = 1.0 / max(1, ramp_epochs(train, epochs))
    return [AdaptiveRegularisation(train_split.augmented_share, step, train.fit_target, initial=float(shares[-1]) if shares else 0.0)]


class DeadlineStop(keras.callbacks.Callback):
    """Stops training at the end of the first epoch that finishes after `deadline` (time.time())."""

    def __init__(self, deadline: float):
        super().__init__()
        self.deadline = deadline

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if time.time() >= self.deadline:
            self.model.stop_training = True


def make_callbacks(params: CallbacksParams, work_dir: Path, checkpoint: bool = True, validation: Any = None,
                   monitors: tuple[str, ...] = (), settle_epochs: int = 0) -> list[keras.callbacks.Callback]:
    """The callbacks for one fit, all writing their state into `work_dir`.

    `checkpoint=False` leaves the best-epoch checkpoint to the caller (a Keras Tuner trial saves its own).
    `validation` (the validation split's dataset) is needed when a monitor, the params' or one of
    `monitors` (the caller's own), is val_macro_f1: that callback then comes first, so every later one sees it.
    `settle_epochs`: early stopping counts from this epoch on (`ramp_epochs`). While the regularisation
    ramps up, the validation loss rises by design; counted from there, NEU seed 43 stopped at epoch 18
    of 41, before the learning rate had decayed, and served its epoch-5 model (test 98.8 %).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    callbacks: list[keras.callbacks.Callback] = [EpochTimer(), LearningRateLogger()]
    if VAL_MACRO_F1 in {params.checkpoint_monitor, params.early_stopping.monitor, *monitors}:
        if validation is None:
            raise ValueError(f"{VAL_MACRO_F1} is monitored but no validation dataset was given to compute it on")
        callbacks.insert(0, ValidationMacroF1(validation))
    monitor = params.checkpoint_monitor
    mode = monitor_mode(monitor)
    if checkpoint:
        threshold = best_so_far(work_dir / HISTORY_CSV, monitor)
        if threshold is not None:
            log.info("resuming: best %s so far %.4f", monitor, threshold)
        callbacks.append(keras.callbacks.ModelCheckpoint(str(work_dir / BEST_CHECKPOINT), monitor=monitor, mode=mode,
                                                         save_best_only=True, initial_value_threshold=threshold))
    if params.early_stopping.enabled:
        es = params.early_stopping
        callbacks.append(keras.callbacks.EarlyStopping(monitor=es.monitor, mode=monitor_mode(es.monitor),
                                                       patience=es.patience, restore_best_weights=False, start_from_epoch=settle_epochs))
    if params.lr_schedule == "plateau":
        p = params.plateau
        callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=p.factor, patience=p.patience, min_lr=p.min_lr))
    if params.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(work_dir / "tensorboard"), histogram_freq=0,
                                                     write_graph=False, profile_batch=0))
    if params.csv_logger:
        callbacks.append(keras.callbacks.CSVLogger(str(work_dir / HISTORY_CSV), append=True))
    if params.backup_and_restore:
        # last, so that an epoch counts as finished only after everything above has recorded it
        callbacks.append(keras.callbacks.BackupAndRestore(str(work_dir / "backup"), save_freq="epoch", double_checkpoint=True))
    return callbacks
