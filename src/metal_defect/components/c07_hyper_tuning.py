"""c07 hyperparameter search with Keras Tuner, and the choice of the served model.

Stage `tune`: a Keras Tuner search (random, bayesian or hyperband) around the best base model
of evaluation (or one named in `tuning.model`), over the space in `tuning.space`. Every trial
trains with the train stage's own pieces (c03 loader, c04 builder, c05 callbacks, the same
loss, optimizer and class weights) for `tuning.epochs_per_trial` epochs; Keras Tuner keeps the
best epoch's weights of each trial. The tuned model is the best trial's checkpoint (not
retrained), written like a train-stage output and evaluated by c06's evaluate_models, through
the predictor, exactly like the base models.

The Keras Tuner project lives in `paths.tuning` (default `<artifacts>/tuning`), in a folder
keyed by the model, the search settings, the training recipe and the prepared data: a
changed space starts a new search, an unchanged one resumes (finished trials are kept). A
trial that raises is recorded as failed (FailedTrialError) and the search goes on; a data or
artifact error is fatal. The wall-clock budget (`tuning.max_minutes`) is enforced by the
oracle, so it also holds for a distributed search: no trial starts after it, and a running
trial stops at its next epoch end.

Distributed: Keras Tuner's chief/worker mode. The chief is the process running this stage
with KERASTUNER_TUNER_ID=chief, KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT set (or
`python main.py run --tune-chief HOST:PORT`); it writes `active.json` into `paths.tuning`
and serves the oracle. Workers (`python main.py tune-worker`) read it, prepare the data
from their own config (reused when the artifacts folder is shared), refuse to take trials
when their data or recipe fingerprint differs from the chief's, and train trials, writing
checkpoints into the shared project folder.

Stage `select`: serves the tuned model only when it is strictly better than the base model
on validation (evaluation.select_metric); ties keep the base model. It copies the chosen
bundle, says in its model card which model is served and why, writes tuning_summary.json,
and points the served model at it.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from metal_defect import artifacts as art
from metal_defect.config import (
    BaseParams,
    CallbacksParams,
    DataLoaderParams,
    DataPreprocessingParams,
    EvaluationParams,
    ModelParams,
    RangeParam,
    Recipe,
    SchemaConfig,
    TrainParams,
    TuningParams,
    fingerprint_of,
    to_plain,
)
from metal_defect.errors import ArtifactError, ConfigError, DataError
from metal_defect.served import SERVED_RECORD
from metal_defect.served import publish as publish_served

log = logging.getLogger(__name__)

TUNED_SUFFIX = "_tuned"
SEARCH_FILE = "search.json"
TRIALS_CSV = "trials.csv"
TRIALS_PLOT = "trials.png"
BEST_HP_FILE = "best_hyperparameters.json"
EVALUATION_DIR = "evaluation"
ACTIVE_FILE = "active.json"  # in paths.tuning: the search a chief serves now (read by workers)
TRIAL_RECORD = "metal_defect_trial.json"  # in a trial folder: worker, duration, status, error
TUNING_SUMMARY = "tuning_summary.json"

INT_KEYS = ("batch_size", "blocks", "convs_per_block", "dense_units", "fine_tune_layers")
CNN_ONLY = ("blocks", "width", "convs_per_block", "pooling", "input_scale")
TRANSFER_ONLY = ("fine_tune_layers",)
AUGMENTATION_KEYS = ("rotation_degrees", "brightness", "contrast", "noise_std", "resample_blur")
MAX_FILTERS = 512


# ----------------------------------------------------------------------------- the recipe a trial trains
def searched_entries(tuning: TuningParams, model_name: str) -> dict[str, Any]:
    """The space entries that apply to `model_name` (custom-CNN keys only for custom_cnn, ...)."""
    from metal_defect.components.c04_model_builder import CUSTOM

    skip = TRANSFER_ONLY if model_name == CUSTOM else CNN_ONLY
    return {name: entry for name, entry in tuning.space.searched().items() if name not in skip}


def declare_space(hp: Any, tuning: TuningParams, model_name: str) -> None:
    """Register the searched entries as Keras Tuner hyperparameters."""
    for name, entry in searched_entries(tuning, model_name).items():
        if isinstance(entry, RangeParam):
            hp.Float(name, entry.min, entry.max, sampling="log" if entry.log else "linear")
        elif name in INT_KEYS:
            hp.Choice(name, sorted({int(v) for v in entry}))
        elif name == "pooling":
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
    """The recipe with a trial's values written where they belong (train, data_loader, model)."""
    values = {k: v for k, v in values.items() if not k.startswith("tuner/")}
    cnn = recipe.model.custom_cnn
    filters = scaled_filters(cnn.filters, values.get("blocks"), values.get("width"))
    cnn = dataclasses.replace(cnn, filters=filters, **{k: values[k] for k in ("convs_per_block", "pooling", "dropout", "dense_units", "input_scale")
                                                        if k in values})
    transfer = dataclasses.replace(recipe.model.transfer, **{k: values[k] for k in ("dropout", "dense_units", "fine_tune_layers") if k in values})
    augmentation = dataclasses.replace(recipe.data_loader.augmentation, **{k: float(values[k]) for k in AUGMENTATION_KEYS if k in values})
    loader = dataclasses.replace(recipe.data_loader, batch_size=int(values.get("batch_size", recipe.data_loader.batch_size)), augmentation=augmentation)
    train = dataclasses.replace(recipe.train, learning_rate=float(values.get("learning_rate", recipe.train.learning_rate)))
    return dataclasses.replace(recipe, data_loader=loader, model=dataclasses.replace(recipe.model, custom_cnn=cnn, transfer=transfer), train=train)


# ----------------------------------------------------------------------------- the search job
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
        """Covers everything that changes what a trial computes (not the budget, not `enabled`)."""
        tuning = {k: v for k, v in to_plain(self.tuning).items() if k not in ("enabled", "max_minutes", "model")}
        return fingerprint_of({"model": self.model_name, "tuning": tuning, "recipe": to_plain(self.recipe)})[:16]

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


# ----------------------------------------------------------------------------- Keras Tuner pieces
def _keras_tuner() -> Any:
    try:
        import keras_tuner
    except ImportError as exc:  # pragma: no cover - it is in requirements.txt
        raise ConfigError("tuning.enabled is true but keras-tuner is not installed: pip install -r requirements.txt, "
                          "or set tuning.enabled=false") from exc
    return keras_tuner


class BudgetMixin:
    """Oracle side of the wall-clock budget: after `deadline` (time.time()) the oracle starts no trial.

    In a distributed search the oracle runs on the chief, so the budget holds for every worker.
    """

    deadline: float | None = None

    def populate_space(self, trial_id: str) -> dict[str, Any]:
        if self.deadline is not None and time.time() >= self.deadline:
            log.info("tuning budget spent: no trial starts after %s", dt.datetime.fromtimestamp(self.deadline).isoformat(timespec="seconds"))
            return {"status": "STOPPED", "values": None}
        return super().populate_space(trial_id)  # type: ignore[misc]


def make_oracle(tuning: TuningParams, deadline: float | None) -> Any:
    """The oracle for tuning.tuner, with the budget."""
    from metal_defect.components.c05_callbacks import monitor_mode

    kt = _keras_tuner()
    common = {"objective": kt.Objective(tuning.objective, monitor_mode(tuning.objective)), "seed": tuning.seed, "max_retries_per_trial": 0,
              "max_consecutive_failed_trials": tuning.max_consecutive_failed_trials}
    if tuning.tuner == "hyperband":
        base, extra = kt.oracles.HyperbandOracle, {"max_epochs": tuning.epochs_per_trial, "factor": 3, "hyperband_iterations": 1}
    else:
        base = kt.oracles.RandomSearchOracle if tuning.tuner == "random" else kt.oracles.BayesianOptimizationOracle
        extra = {"max_trials": tuning.max_trials}
    oracle = type(f"Budgeted{base.__name__}", (BudgetMixin, base), {})(**common, **extra)
    oracle.deadline = deadline
    return oracle


@dataclasses.dataclass(frozen=True)
class TrialSetup:
    """What every trial of a search shares: the input shape, classes, pixel statistics and class weights."""

    image_shape: tuple[int, int, int]
    n_classes: int
    n_train: int
    pixel_stats: tuple[float, float]
    class_weights: dict[int, float] | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrialSetup:
        """From `dataclasses.asdict` through JSON (lists for tuples, string keys for the class weights)."""
        weights = data["class_weights"]
        return cls(tuple(data["image_shape"]), data["n_classes"], data["n_train"], tuple(data["pixel_stats"]),
                   {int(k): float(v) for k, v in weights.items()} if weights is not None else None)


def trial_setup(prepared: Path, recipe: Recipe) -> TrialSetup:
    """Read c02's records once: the same shape, statistics and class weights the train stage uses."""
    from metal_defect.components.c03_dataset_loader import read_records
    from metal_defect.components.c06_training import class_weights, pixel_statistics, use_class_weights

    records = read_records(prepared)
    channels = 1 if records["color_mode"] == "grayscale" else 3
    rows = [r for r in records["records"] if r["split"] == "train"]
    labels = np.array([r["label_index"] for r in rows])
    n_classes = len(records["classes"])
    weights = class_weights(labels, n_classes, recipe.train.class_weight_power) if use_class_weights(recipe.train.class_weights, labels) else None
    return TrialSetup((records["image_size"], records["image_size"], channels), n_classes, len(rows),
                      pixel_statistics([Path(prepared) / r["file"] for r in rows]), weights)


def build_trial_model(model_name: str, recipe: Recipe, setup: TrialSetup, epochs: int) -> Any:
    """The trial's model, built and compiled like the train stage's (c04 builder, same loss, optimizer and schedule)."""
    from metal_defect.components import c04_model_builder as builder
    from metal_defect.components.c05_callbacks import learning_rate
    from metal_defect.components.c06_training import compile_model

    built = builder.build_model(model_name, setup.image_shape, setup.n_classes, recipe.model, setup.pixel_stats)
    if built.schedule == "two_phase":  # a pretrained backbone: one phase with its top layers trained
        builder.unfreeze_top(built, recipe.model.transfer.fine_tune_layers)
    steps = math.ceil(setup.n_train / recipe.data_loader.batch_size)
    compile_model(built.model, recipe.train, learning_rate(recipe.callbacks, recipe.train.learning_rate, steps, epochs))
    return built.model


def build_tuner(job: SearchJob, project: Path, deadline: float | None) -> Any:
    """A Keras Tuner over `job`, its project in `project` (resumed when it exists).

    Each trial trains in a child process (`python -m metal_defect.components.c07_hyper_tuning`):
    TensorFlow keeps ~12 MB of every fitted graph for the life of a process (clear_session does
    not return it), so in-process trials grow without bound; a child also turns a crash or an
    out-of-memory kill into one failed trial instead of the end of the search.
    """
    kt = _keras_tuner()
    import keras

    from metal_defect.components.c05_callbacks import best_of

    setup = trial_setup(job.prepared, job.recipe)
    epochs = job.tuning.epochs_per_trial

    class TrialModel(kt.HyperModel):
        """The space, and the model of a set of values (built in this process only to read a trial's checkpoint)."""

        def declare_hyperparameters(self, hp: Any) -> None:
            declare_space(hp, job.tuning, job.model_name)

        def build(self, hp: Any) -> Any:
            return build_trial_model(job.model_name, apply_hyperparameters(job.recipe, hp.values), setup, epochs)

    class SearchTuner(kt.Tuner):
        """Runs each trial in a child process, logs it, records who ran it and how long it took; any trial error is a failed trial."""

        def run_trial(self, trial: Any, *args: Any, **kwargs: Any) -> Any:
            values = trial.hyperparameters.values
            trial_dir = Path(self.get_trial_dir(trial.trial_id))
            resume = values.get("tuner/trial_id")  # hyperband: continue from an earlier bracket's weights
            spec = {"model_name": job.model_name, "recipe": to_plain(job.recipe), "prepared": str(job.prepared), "values": _shown(values),
                    "setup": dataclasses.asdict(setup),
                    "epochs": int(values.get("tuner/epochs", epochs)), "schedule_epochs": epochs,
                    "initial_epoch": int(values.get("tuner/initial_epoch", 0)), "deadline": deadline, "objective": job.tuning.objective,
                    "checkpoint": self._get_checkpoint_fname(trial.trial_id),
                    "resume_from": self._get_checkpoint_fname(resume) if resume else None}
            record = {"trial_id": trial.trial_id, "worker": self.tuner_id, "host": socket.gethostname(), "started": art.now_iso(),
                      "hyperparameters": _shown(values)}
            started = time.monotonic()
            log.info("trial %s start on %s: %s", trial.trial_id, self.tuner_id, _format(values))
            try:
                history = run_trial_process(spec, trial_dir)
            except (DataError, ArtifactError) as exc:
                raise kt.errors.FatalError(str(exc)) from exc
            except TrialFailed as exc:
                record |= {"status": "FAILED", "error": str(exc)[:2000], "duration_s": round(time.monotonic() - started, 2), "rss_mb": resident_mb()}
                art.write_json_atomic(trial_dir / TRIAL_RECORD, record)
                log.warning("trial %s FAILED after %.1f s: %s", trial.trial_id, record["duration_s"], str(exc).splitlines()[-1][:300])
                raise kt.errors.FailedTrialError(record["error"]) from exc
            scores = history.get(job.tuning.objective, [])
            best = best_of(scores, job.tuning.objective)
            record |= {"status": "COMPLETED", "duration_s": round(time.monotonic() - started, 2), "epochs": len(scores), job.tuning.objective: best,
                       "rss_mb": resident_mb()}
            art.write_json_atomic(trial_dir / TRIAL_RECORD, record)
            log.info("trial %s end after %.1f s: best %s %s", trial.trial_id, record["duration_s"], job.tuning.objective,
                     f"{best:.5f}" if best is not None else "-")
            result = keras.callbacks.History()
            result.history = history
            return result

    return SearchTuner(oracle=make_oracle(job.tuning, deadline), hypermodel=TrialModel(), directory=str(project.parent),
                       project_name=project.name, overwrite=False)


class TrialFailed(Exception):
    """A trial's child process failed (an error in building or training, a crash, or a kill)."""


TRIAL_SPEC = "trial_spec.json"
TRIAL_RESULT = "trial_result.json"
TRIAL_LOG = "trial.log"


def run_trial_process(spec: dict[str, Any], trial_dir: Path) -> dict[str, list[float]]:
    """Train one trial in a child process; its per-epoch history, or TrialFailed with the child's error."""
    import subprocess
    import sys

    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / TRIAL_RESULT).unlink(missing_ok=True)
    art.write_json_atomic(trial_dir / TRIAL_SPEC, spec)
    package_root = str(Path(__file__).resolve().parents[2])  # the child imports this package from where the parent did
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
           "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)}
    with open(trial_dir / TRIAL_LOG, "w", encoding="utf-8") as handle:
        code = subprocess.call([sys.executable, "-m", __name__, str(trial_dir)], stdout=handle, stderr=subprocess.STDOUT, env=env)
    result = art.read_json(trial_dir / TRIAL_RESULT) if (trial_dir / TRIAL_RESULT).is_file() else {}
    if code == 0 and "history" in result:
        return result["history"]
    if result.get("fatal"):
        raise DataError(result["error"])
    tail = (trial_dir / TRIAL_LOG).read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
    how = f"exit code {code}" if code >= 0 else f"killed by signal {-code}"
    raise TrialFailed(result.get("error") or f"the trial process ended with {how}: " + " | ".join(tail))


def train_trial(trial_dir: Path) -> dict[str, list[float]]:
    """The child process: build the trial's model and fit it with the train stage's loader and callbacks,
    keeping the best epoch's weights (by the objective) at spec['checkpoint']."""
    import keras

    from metal_defect.components.c03_dataset_loader import build_datasets
    from metal_defect.components.c05_callbacks import HISTORY_CSV, DeadlineStop, make_callbacks, monitor_mode
    from metal_defect.components.c06_training import make_strategy, scaled_patience

    spec = art.read_json(trial_dir / TRIAL_SPEC)
    recipe = Recipe.from_plain(spec["recipe"])
    recipe = apply_hyperparameters(recipe, spec["values"])
    prepared = Path(spec["prepared"])
    keras.utils.set_random_seed(recipe.base.seed)
    setup = TrialSetup.from_json(spec["setup"])  # computed once by the parent, not again in every trial
    with make_strategy(recipe.train.strategy).scope():  # a worker's local GPUs (MirroredStrategy over 2 or more), as in training
        model = build_trial_model(spec["model_name"], recipe, setup, spec["schedule_epochs"])
        if spec.get("resume_from"):
            model.load_weights(spec["resume_from"])
    data = build_datasets(prepared, recipe.data_loader, recipe.base.seed, splits=("train", "valid"))
    params = dataclasses.replace(scaled_patience(recipe.callbacks, spec["schedule_epochs"], recipe.train.epochs), tensorboard=False,
                                 backup_and_restore=False)
    (trial_dir / HISTORY_CSV).unlink(missing_ok=True)  # a re-run trial starts its log again
    callbacks = make_callbacks(params, trial_dir, checkpoint=False)
    objective = spec["objective"]
    callbacks.insert(0, keras.callbacks.ModelCheckpoint(spec["checkpoint"], monitor=objective, mode=monitor_mode(objective),
                                                        save_best_only=True, save_weights_only=True))
    if spec.get("deadline"):
        callbacks.append(DeadlineStop(spec["deadline"]))
    fit = model.fit(data["train"].dataset, validation_data=data["valid"].dataset, epochs=spec["epochs"], initial_epoch=spec["initial_epoch"],
                    callbacks=callbacks, class_weight=setup.class_weights, verbose=0, shuffle=False)
    return {k: [float(v) for v in values] for k, values in fit.history.items()}


def _trial_main(argv: list[str]) -> int:
    """`python -m metal_defect.components.c07_hyper_tuning TRIAL_DIR`: one trial, result in TRIAL_DIR/trial_result.json."""
    import traceback

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trial_dir = Path(argv[0])
    try:
        history = train_trial(trial_dir)
    except (DataError, ArtifactError) as exc:
        art.write_json_atomic(trial_dir / TRIAL_RESULT, {"error": str(exc), "fatal": True})
        return 2
    except Exception as exc:  # the parent records the trial as failed with this message
        traceback.print_exc()
        message = f"{type(exc).__name__}: {exc}"
        art.write_json_atomic(trial_dir / TRIAL_RESULT, {"error": message})
        return 1
    art.write_json_atomic(trial_dir / TRIAL_RESULT, {"history": history})
    return 0


def resident_mb() -> float | None:
    """This process's resident memory in MB (Linux /proc; None elsewhere): recorded per trial, to see that it stays flat."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 1e6, 1)


def _shown(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if not k.startswith("tuner/")}


def _format(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in _shown(values).items()) or "defaults"


# ----------------------------------------------------------------------------- running a search
def join_search(tuner_id: str, address: str, option: str) -> None:
    """Set Keras Tuner's three environment variables for this process: `tuner_id` ('chief' or a worker id)
    and the oracle's HOST:PORT (`option` names where the address came from, for the error message)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{option} {address}: expected HOST:PORT, e.g. 10.0.0.5:8000")
    os.environ.update({"KERASTUNER_TUNER_ID": tuner_id, "KERASTUNER_ORACLE_IP": host, "KERASTUNER_ORACLE_PORT": port})


def distributed_role() -> str:
    """local, chief or worker, from Keras Tuner's environment variables."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "local"
    missing = [v for v in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID") if v not in os.environ]
    if missing:
        raise ConfigError(f"KERASTUNER_ORACLE_IP is set but {', '.join(missing)} is not: a distributed search needs all three "
                          "(or start it with `python main.py run --tune-chief HOST:PORT` and `python main.py tune-worker --chief HOST:PORT`)")
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


def search(job: SearchJob, project: Path) -> Any:
    """Run (or resume) the search in `project`; returns the tuner (on a chief: after every worker finished)."""
    role = distributed_role()
    deadline = time.time() + job.tuning.max_minutes * 60
    tuner = build_tuner(job, project, deadline)
    finished = sum(t.status in ("COMPLETED", "FAILED", "INVALID") for t in tuner.oracle.trials.values())
    log.info("tuning %s (%s, %s): project %s; %d finished trial(s) kept; budget %.0f min; %s", job.model_name, job.tuning.tuner,
             role, project, finished, job.tuning.max_minutes, _space_text(job))
    if role == "chief":
        address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
        active = project.parent / ACTIVE_FILE
        art.write_json_atomic(active, {"state": "running", "project": project.name, "chief": address, "model": job.model_name,
                                       "recipe_fingerprint": job.recipe_fingerprint, "data_fingerprint": job.data_fingerprint,
                                       "started": art.now_iso(), "deadline": deadline})
        log.info("chief: serving the oracle on %s; start workers with `python main.py tune-worker --chief HOST:%s`",
                 address, os.environ["KERASTUNER_ORACLE_PORT"])
    try:
        tuner.search(verbose=0)
    except RuntimeError as exc:  # Keras Tuner's "consecutive failures exceeded the limit"
        if "consecutive failures" not in str(exc):
            raise
        log.warning("search stopped: %s", str(exc).splitlines()[0])
    finally:
        if role == "chief":
            art.write_json_atomic(project.parent / ACTIVE_FILE, {**art.read_json(project.parent / ACTIVE_FILE), "state": "finished",
                                                                 "ended": art.now_iso()})
    return tuner


def _space_text(job: SearchJob) -> str:
    entries = searched_entries(job.tuning, job.model_name)
    shown = [f"{k} {v.min:g}..{v.max:g}{' (log)' if v.log else ''}" if isinstance(v, RangeParam) else f"{k} {v}" for k, v in entries.items()]
    return "space: " + ("; ".join(shown) or "empty (one trial of the recipe as it is)")


def trial_rows(tuner: Any, project: Path, objective: str) -> list[dict[str, Any]]:
    """Every trial: id, status, objective, duration, worker, error and hyperparameters (oracle + our trial records)."""
    rows = []
    for trial_id, trial in sorted(tuner.oracle.trials.items()):
        record_path = project / f"trial_{trial_id}" / TRIAL_RECORD
        record = art.read_json(record_path) if record_path.is_file() else {}
        status = str(trial.status)
        rows.append({"trial_id": trial_id, "status": status, "objective": objective,
                     "score": trial.score if trial.score is not None and status == "COMPLETED" else None,
                     "best_epoch": trial.best_step if status == "COMPLETED" else None, "duration_s": record.get("duration_s"),
                     "worker": record.get("worker"), "host": record.get("host"), "rss_mb": record.get("rss_mb"), "error": record.get("error", ""),
                     **{f"hp_{k}": v for k, v in _shown(trial.hyperparameters.values).items()}})
    return rows


def write_trials_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row)) or ["trial_id"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def most_influential(rows: list[dict[str, Any]]) -> tuple[str | None, float]:
    """The hyperparameter whose values rank-correlate most with the score over completed trials (|Spearman rho|)."""
    from scipy.stats import spearmanr

    done = [r for r in rows if r["score"] is not None]
    best: tuple[str | None, float] = (None, 0.0)
    for key in dict.fromkeys(k for r in done for k in r if k.startswith("hp_")):
        values = [r.get(key) for r in done]
        if len(set(map(str, values))) < 2 or len(done) < 3:
            continue
        codes = values if all(isinstance(v, (int, float)) for v in values) else [sorted(set(map(str, values))).index(str(v)) for v in values]
        rho = spearmanr(codes, [r["score"] for r in done]).statistic
        if np.isfinite(rho) and abs(rho) > abs(best[1]):
            best = (key.removeprefix("hp_"), float(rho))
    if best[0] is None and done:
        first = next((k for k in done[0] if k.startswith("hp_")), None)
        best = (first.removeprefix("hp_") if first else None, float("nan"))
    return best


def plot_trials(rows: list[dict[str, Any]], objective: str, path: Path, base_value: float | None = None) -> Path:
    """Objective per trial (failed trials marked, the base model's value as a line) and objective against the
    most influential hyperparameter."""
    from metal_defect.plots import tuning_trials

    influential, rho = most_influential(rows)
    return tuning_trials(rows, objective, influential, rho, path, base_value)


def base_objective(trained: Path, model_name: str, objective: str) -> float | None:
    """The base model's best value of the objective over its training epochs (None when not recorded)."""
    from metal_defect.components.c06_training import HISTORY_FILE, MODELS_DIR

    history_file = Path(trained) / MODELS_DIR / model_name / HISTORY_FILE
    from metal_defect.components.c05_callbacks import best_of

    return best_of([row[objective] for row in (json.loads(history_file.read_text()) if history_file.is_file() else []) if objective in row], objective)


# ----------------------------------------------------------------------------- the tune stage
def run_stage(io: Any, *, base: BaseParams, data_loader: DataLoaderParams, model: ModelParams, callbacks: CallbacksParams,
              train: TrainParams, tuning: TuningParams, evaluation: EvaluationParams, data_preprocessing: DataPreprocessingParams,
              schema: SchemaConfig) -> dict[str, Any]:
    """Runner entry: search, then write and evaluate the tuned model (or record that tuning is off)."""
    if not tuning.enabled:
        art.write_json_atomic(io.out_dir / SEARCH_FILE, {"enabled": False})
        log.info("tuning.enabled is false: no search; the base model competes alone")
        return {"enabled": False}
    from metal_defect.components.c06_evaluation import BEST_FILE

    name = art.read_json(io.inputs["evaluation"] / BEST_FILE)["name"] if tuning.model == "best" else tuning.model
    if name not in train.models and tuning.model != "best":
        log.info("tuning.model %s is not in train.models: it is tuned from scratch and competes with the base models", name)
    prepared = io.inputs["data_preprocessing"]
    job = SearchJob(name, Recipe(base, data_loader, model, callbacks, train), tuning, prepared, data_fingerprint(prepared))
    project = Path(io.tuning_dir) / job.key
    started = time.monotonic()
    tuner = search(job, project)
    return write_results(io, tuner, job, project, time.monotonic() - started, evaluation, data_preprocessing, schema)


def write_results(io: Any, tuner: Any, job: SearchJob, project: Path, seconds: float, evaluation: EvaluationParams,
                  limits: DataPreprocessingParams, schema: SchemaConfig) -> dict[str, Any]:
    """trials.csv and plot, best hyperparameters, the tuned model laid out like a train output, its evaluation."""
    from metal_defect.components.c05_callbacks import HISTORY_CSV, read_history
    from metal_defect.components.c06_evaluation import evaluate_models
    from metal_defect.components.c06_training import HISTORY_FILE, MODELS_DIR, TRAIN_SUMMARY, TRAINED_MODEL

    out = io.out_dir
    rows = trial_rows(tuner, project, job.tuning.objective)
    write_trials_csv(rows, out / TRIALS_CSV)
    completed = [r for r in rows if r["score"] is not None]
    failed = [r for r in rows if r["status"] in ("FAILED", "INVALID")]
    if rows:
        plot_trials(rows, job.tuning.objective, out / TRIALS_PLOT, base_objective(io.inputs["train"], job.model_name, job.tuning.objective))
    summary: dict[str, Any] = {"enabled": True, "model": job.model_name, "tuner": job.tuning.tuner, "objective": job.tuning.objective,
                               "project": str(project), "search_seconds_this_run": round(seconds, 1), "trials_completed": len(completed),
                               "trials_failed": len(failed), "best_hyperparameters": None, "tuned_model": None,
                               "tuned_model_source": "the best trial's best-epoch checkpoint (not retrained)"}
    best_trials = tuner.oracle.get_best_trials(1) if completed else []
    if not best_trials:
        log.warning("tuning: no trial completed (%d failed); the base model competes alone", len(failed))
        art.write_json_atomic(out / SEARCH_FILE, summary)
        return {"enabled": True, "trials_completed": 0, "trials_failed": len(failed)}
    best = best_trials[0]
    values = _shown(best.hyperparameters.values)
    art.write_json_atomic(out / BEST_HP_FILE, {"trial_id": best.trial_id, "score": best.score, "objective": job.tuning.objective,
                                               "hyperparameters": values})
    tuned_name = job.model_name + TUNED_SUFFIX
    target = out / MODELS_DIR / tuned_name
    target.mkdir(parents=True)
    tuned = tuner.load_model(best)
    tuned.save(target / TRAINED_MODEL)
    history = [{**row, "phase": "trial", "global_epoch": i + 1} for i, row in enumerate(read_history(project / f"trial_{best.trial_id}" / HISTORY_CSV))]
    (target / HISTORY_FILE).write_text(json.dumps(history, indent=1))
    from metal_defect.components.c03_dataset_loader import read_records
    from metal_defect.components.c04_model_builder import CUSTOM, parameter_counts

    transfer_weights = job.recipe.model.transfer.weights
    pretrained = job.model_name != CUSTOM and transfer_weights != "none"
    seconds_per_epoch = [row["epoch_seconds"] for row in history[1:] if "epoch_seconds" in row]
    info = {"name": tuned_name, "pretrained": pretrained, "weights": transfer_weights if pretrained else "random",
            "schedule": "one tuning trial", "phases": ["trial"], "epochs_run": len(history),
            "median_epoch_seconds": round(float(np.median(seconds_per_epoch)), 3) if seconds_per_epoch else None,
            "strategy": "default (one device)", "replicas": 1, "trial_id": best.trial_id, "hyperparameters": values,
            "parameters": parameter_counts(tuned)}
    art.write_json_atomic(out / TRAIN_SUMMARY, {"models": {tuned_name: info}, "class_names": read_records(job.prepared)["classes"],
                                                "image_shape": list(tuned.input_shape[1:])})
    summary |= {"best_hyperparameters": values, "best_trial": best.trial_id, "best_score": best.score, "tuned_model": tuned_name}
    art.write_json_atomic(out / SEARCH_FILE, summary)
    log.info("tuning: %d trials completed, %d failed; best trial %s (%s %.5f): %s", len(completed), len(failed), best.trial_id,
             job.tuning.objective, best.score, _format(values))
    result = evaluate_models(io.inputs["data_ingestion"], job.prepared, out, evaluation, out / EVALUATION_DIR, run_id=io.run_id, limits=limits,
                             extensions=tuple(schema.extensions), kind="tuned")
    metrics = {f"tuned_{k}": v for k, v in result["metrics"].items() if k != "best_model"}
    return {"enabled": True, "trials_completed": len(completed), "trials_failed": len(failed), "best_hyperparameters": values,
            "metrics": metrics}


# ----------------------------------------------------------------------------- the select stage
def choose_served(base: Mapping[str, Any], tuned: Mapping[str, Any] | None, metric: str) -> tuple[str, str]:
    """('tuned' or 'base', reason): tuned only when strictly better on validation `metric`; ties keep the base."""
    base_value = base["valid"][metric]
    if tuned is None:
        return "base", "no tuned model (tuning off, or no trial completed)"
    tuned_value = tuned["valid"][metric]
    if tuned_value > base_value:
        return "tuned", f"tuned model better on validation {metric}: {tuned_value:.4f} against the base model's {base_value:.4f}"
    relation = "equal" if tuned_value == base_value else "worse"
    return "base", f"tuned model not strictly better on validation {metric} ({relation}: {tuned_value:.4f} against {base_value:.4f}); ties keep the base model"


def select_stage(io: Any, *, evaluation: EvaluationParams) -> dict[str, Any]:
    """Runner entry: serve the base or the tuned model, and say which and why."""
    from metal_defect.components.c06_evaluation import BEST_FILE, metrics_files
    from metal_defect.serving.bundle import BUNDLE_DIR, MODEL_CARD, write_manifest

    base_dir = io.inputs["evaluation"]
    tune_dir = io.inputs["tune"]
    base = art.read_json(base_dir / BEST_FILE)
    tuned_record = tune_dir / EVALUATION_DIR / metrics_files("tuned")[1]
    tuned = art.read_json(tuned_record) if tuned_record.is_file() else None
    search_info = art.read_json(tune_dir / SEARCH_FILE) if (tune_dir / SEARCH_FILE).is_file() else {"enabled": False}
    served, reason = choose_served(base, tuned, evaluation.select_metric)
    chosen_dir = tune_dir / EVALUATION_DIR if served == "tuned" else base_dir
    record = dict(tuned if served == "tuned" else base)
    bundle = io.out_dir / BUNDLE_DIR
    shutil.copytree(chosen_dir / BUNDLE_DIR, bundle)
    card = (bundle / MODEL_CARD).read_text(encoding="utf-8")
    section = _served_section(served, reason, base, tuned, search_info, evaluation.select_metric)
    (bundle / MODEL_CARD).write_text(card + section, encoding="utf-8")
    shutil.copy2(bundle / MODEL_CARD, io.out_dir / MODEL_CARD)
    write_manifest(bundle)
    summary = {"trials_completed": search_info.get("trials_completed", 0), "trials_failed": search_info.get("trials_failed", 0),
               "best_hyperparameters": search_info.get("best_hyperparameters"), "served": served, "reason": reason,
               "tuning_enabled": search_info.get("enabled", False), "base_model": base["name"], "tuned_model": tuned["name"] if tuned else None,
               "valid": {"base": base["valid"], "tuned": tuned["valid"] if tuned else None},
               "test": {"base": base.get("test"), "tuned": tuned.get("test") if tuned else None}}
    art.write_json_atomic(io.out_dir / TUNING_SUMMARY, summary)
    art.write_json_atomic(io.out_dir / SERVED_RECORD, record | {"served": served, "reason": reason})
    log.info("served: %s model %s (%s)", served, record["name"], reason)
    headline = {"best_model": record["name"], "served": served, "valid_accuracy": record["valid"]["accuracy"],
                "valid_macro_f1": record["valid"]["macro_f1"], "weak_model": record.get("weak_model", False)}
    if record.get("test"):
        headline |= {"test_accuracy": record["test"]["accuracy"], "test_macro_f1": record["test"]["macro_f1"]}
    return {"served": served, "reason": reason, "metrics": headline}


def _served_section(served: str, reason: str, base: Mapping[str, Any], tuned: Mapping[str, Any] | None, search_info: Mapping[str, Any],
                    metric: str) -> str:
    lines = ["", "## Which model is served, and why", "",
             f"- Served: **{served}** model `{(tuned if served == 'tuned' else base)['name']}`. {reason[0].upper()}{reason[1:]}."]
    if search_info.get("enabled"):
        lines.append(f"- Keras Tuner search ({search_info.get('tuner')}, objective {search_info.get('objective')}): "
                     f"{search_info.get('trials_completed', 0)} trials completed, {search_info.get('trials_failed', 0)} failed; "
                     f"the tuned model is {search_info.get('tuned_model_source')}.")
        if search_info.get("best_hyperparameters"):
            lines.append(f"- Best hyperparameters: {_format(search_info['best_hyperparameters'])}.")
    else:
        lines.append("- Tuning was off (tuning.enabled: false).")
    for label, rec in (("base", base), ("tuned", tuned)):
        if rec:
            test = rec.get("test") or {}
            lines.append(f"- {label}: validation {metric} {rec['valid'][metric]:.4f}"
                         + (f", test accuracy {test['accuracy']:.4f}, test macro F1 {test['macro_f1']:.4f}" if test else ""))
    return "\n".join(lines) + "\n"


def publish(store: art.ArtifactStore, run_id: str, output: Path) -> dict[str, Any]:
    """The select stage's publish step: serve the bundle it chose (see `metal_defect.served`)."""
    return publish_served(store, run_id, output)


# ----------------------------------------------------------------------------- workers
def wait_for_chief(root: Path, wait_s: float, poll_s: float = 1.0) -> dict[str, Any]:
    """The chief's active.json once it says running (a worker may start before the chief)."""
    path = root / ACTIVE_FILE
    give_up = time.monotonic() + wait_s
    said = False
    while True:
        if path.is_file():
            try:
                active = art.read_json(path)
            except ArtifactError:
                active = {}
            if active.get("state") == "running":
                return active
        if time.monotonic() >= give_up:
            raise ArtifactError(f"tune-worker: no running search announced in {path} after {wait_s:.0f} s; start the chief first "
                                "(`python main.py run --tune-chief HOST:PORT`), and point paths.tuning at the folder it uses")
        if not said:
            log.info("tune-worker: waiting for a chief to announce a search in %s", path)
            said = True
        time.sleep(poll_s)


def take_trials(job: SearchJob, active: Mapping[str, Any], project: Path, chief: str | None, worker_id: str | None) -> dict[str, Any]:
    """A worker's part of a distributed search: check the job against the chief's, then take trials until none are left."""
    from metal_defect import runtime

    if job.data_fingerprint != active["data_fingerprint"]:
        raise DataError(f"tune-worker refuses to take trials: its prepared data (fingerprint {job.data_fingerprint}, from "
                        f"{job.prepared}) differs from the chief's ({active['data_fingerprint']}); use the same data "
                        "source, schema and data_preprocessing params as the chief, or share its artifacts folder")
    if job.recipe_fingerprint != active["recipe_fingerprint"]:
        raise ConfigError(f"tune-worker refuses to take trials: its training recipe or search settings (fingerprint {job.recipe_fingerprint}) "
                          f"differ from the chief's ({active['recipe_fingerprint']}); use the same params.yaml as the chief")
    address = chief or active["chief"]
    worker_id = worker_id or f"worker-{socket.gethostname()}-{os.getpid()}"
    if "chief" in worker_id:
        raise ConfigError(f"tune-worker --id {worker_id}: a worker id must not contain 'chief' (Keras Tuner would take it for the chief)")
    join_search(worker_id, address, "tune-worker --chief")
    runtime.import_tensorflow()
    log.info("tune-worker %s: taking trials from the chief at %s (project %s)", worker_id, address, project)
    tuner = build_tuner(job, project, active.get("deadline"))
    tuner.search(verbose=0)
    ran = [p.parent.name for p in project.glob(f"trial_*/{TRIAL_RECORD}") if art.read_json(p).get("worker") == worker_id]
    log.info("tune-worker %s: the chief has no more trials; this worker ran %d: %s", worker_id, len(ran), ", ".join(sorted(ran)) or "none")
    return {"worker": worker_id, "trials": sorted(ran), "project": str(project)}


if __name__ == "__main__":
    import sys

    sys.exit(_trial_main(sys.argv[1:]))
