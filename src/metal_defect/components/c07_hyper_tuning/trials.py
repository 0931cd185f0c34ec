"""c07 trials: the Keras Tuner oracle with the wall-clock budget, the tuner, and each trial trained in a child process."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np

from metal_defect import artifacts as art
from metal_defect.components import c04_model_builder as builder
from metal_defect.components.c03_dataset_loader import balanced_sampling, build_datasets, read_records
from metal_defect.components.c05_callbacks import (
    HISTORY_CSV,
    DeadlineStop,
    best_of,
    learning_rate,
    monitor_mode,
)
from metal_defect.components.c06_training import (
    compile_model,
    fit_callbacks,
    make_strategy,
    training_class_weights,
    training_input,
    with_input_normalization,
)
from metal_defect.components.c07_hyper_tuning.finalist import BudgetPlan
from metal_defect.components.c07_hyper_tuning.space import (
    SearchJob,
    apply_hyperparameters,
    bayesian_initial_points,
    declare_space,
    format_values,
    recipe_point,
    shown_values,
)
from metal_defect.config import Recipe, TuningParams, to_plain
from metal_defect.errors import ArtifactError, ConfigError, DataError

log = logging.getLogger(__name__)

TRIAL_RECORD = "metal_defect_trial.json"  # in a trial folder: worker, duration, status, error
MEDIAN_EPOCH_SECONDS = "median_epoch_seconds"  # a trial's median epoch time after its first (the graph's tracing)


def _keras_tuner() -> Any:
    """Keras Tuner, imported lazily on purpose: a missing install becomes one line saying what to do."""
    try:
        import keras_tuner
    except ImportError as exc:  # pragma: no cover - it is in requirements.txt
        raise ConfigError("tuning.enabled is true but keras-tuner is not installed: pip install -r requirements.txt, "
                          "or set tuning.enabled=false") from exc
    return keras_tuner


def trial_epoch_seconds(trial: Any) -> float | None:
    """A finished trial's epoch time: the median of its epochs after the first (None when it recorded none). One
    epoch's time misleads: on the proxy (2026-12-07) the best epoch of the best trial took 16.1 s, its epochs
    16.1-22.9 s, and its full training a median 16.9 s."""
    for name in (MEDIAN_EPOCH_SECONDS, "epoch_seconds"):  # a trial of an older search has only its best epoch's
        if trial.metrics.exists(name) and trial.metrics.get_history(name):
            return float(trial.metrics.get_history(name)[-1].value[0])
    return None


def best_epoch_seconds(oracle: Any) -> float | None:
    """The epoch time of `oracle`'s best trial so far (None before one completed). `oracle` is our own or a worker's
    client of the chief's: both answer get_best_trials and get_trial."""
    best = oracle.get_best_trials(1)
    return trial_epoch_seconds(best[0]) if best else None


def first_trial_id(max_trials: int) -> str:
    """The id Keras Tuner gives a search's first trial: 0, zero-padded to the digits of max_trials."""
    return f"{0:0{len(str(max_trials))}d}"


def finalist_epoch_seconds(oracle: Any, plan: BudgetPlan | None, recipe_trial: str | None) -> float | None:
    """The best trial's configuration's expected epoch time in the train stage: its trial's, scaled by the base
    model's epochs in the train stage against the recipe's own trial (`recipe_trial`, the same network as the base
    model, trained under the trials' conditions). A trial's epochs ran 1.4-2 times the train stage's on this shared
    machine (X-SDD, 2026-12-07: the recipe's trial a median 14 s, the base model 10.2 s; the best trial 19.1 s, its
    finalist 10.6 s), so the trial's own time brought the deadline forward too early; the ratio of two trials is
    steadier (the proxy: 20.7 / 8.5 x 8.0 = 19.5 s, its finalist 19.5 s). Without the recipe's trial, the base
    model's epoch time or a plan, the best trial's own time."""
    best_s = best_epoch_seconds(oracle)
    if best_s is None or plan is None or not plan.base_epoch_s or recipe_trial is None:
        return best_s
    try:
        recipe_s = trial_epoch_seconds(oracle.get_trial(recipe_trial))
    except KeyError:  # our own oracle before the trial exists (a worker's client answers for the chief's)
        return best_s
    return best_s * plan.base_epoch_s / recipe_s if recipe_s else best_s


class BudgetMixin:
    """Oracle side of the wall-clock budget (`plan`): no trial starts after the search's deadline, brought forward
    when the best trial so far is slower than the base model, so that its full training still fits. When
    `recipe_values` is set, the search's first trial is that point (the recipe itself), then the oracle's own.

    In a distributed search the oracle runs on the chief, so the budget holds for every worker.
    """

    plan: BudgetPlan | None = None
    recipe_values: dict[str, Any] | None = None

    def best_epoch_seconds(self) -> float | None:
        """The epoch time of the best trial so far (`best_epoch_seconds`)."""
        return best_epoch_seconds(self)

    @property
    def recipe_trial(self) -> str | None:
        """The recipe's own trial's id, when the search starts with it (None otherwise)."""
        return first_trial_id(self.max_trials) if self.recipe_values is not None else None  # type: ignore[attr-defined]

    def finalist_epoch_seconds(self) -> float | None:
        """The best configuration's expected epoch time in the train stage (`finalist_epoch_seconds`)."""
        return finalist_epoch_seconds(self, self.plan, self.recipe_trial)

    def current_deadline(self) -> tuple[float | None, str]:
        """The time after which no trial starts and a running one stops (None without a plan), and why it is
        earlier than the plan's search deadline ('' when it is not)."""
        if self.plan is None:
            return None, ""
        epoch_s = self.finalist_epoch_seconds()
        deadline = self.plan.trial_deadline(epoch_s)
        if deadline >= self.plan.search_deadline:
            return deadline, ""
        own = self.best_epoch_seconds()
        scaled = "" if own == epoch_s else f" in the train stage (its trial: {own:.1f} s, scaled by the base model's against the recipe's trial)"
        return deadline, (f" (brought forward: the best configuration so far trains an epoch in {epoch_s:.1f} s{scaled}, so its full "
                          f"{self.plan.finalist_epochs} epochs need ~{(self.plan.end - deadline) / 60:.1f} min of the budget)")

    def is_recipe(self, values: Mapping[str, Any]) -> bool:
        """Whether a trial's `values` are the recipe's own point (retrained, that is the base model again)."""
        return self.recipe_values is not None and shown_values(values) == self.recipe_values

    def populate_space(self, trial_id: str) -> dict[str, Any]:
        deadline, why = self.current_deadline()
        if deadline is not None and time.time() >= deadline:
            log.info("tuning budget spent: no trial starts after %s%s", dt.datetime.fromtimestamp(deadline).isoformat(timespec="seconds"), why)
            return {"status": "STOPPED", "values": None}
        if self.recipe_values is not None and not self.trials:  # type: ignore[attr-defined]
            return {"status": "RUNNING", "values": dict(self.recipe_values)}
        return super().populate_space(trial_id)  # type: ignore[misc]


def make_oracle(tuning: TuningParams, plan: BudgetPlan | None = None, recipe_values: dict[str, Any] | None = None) -> Any:
    """The oracle for tuning.tuner, with the budget `plan` (none: no deadline); a random or Bayesian search tries
    `recipe_values` (the recipe's own point, None when it is not one of the space) first, and says so; Hyperband
    keeps its own brackets."""
    kt = _keras_tuner()
    common = {"objective": kt.Objective(tuning.objective, monitor_mode(tuning.objective)), "seed": tuning.seed, "max_retries_per_trial": 0,
              "max_consecutive_failed_trials": tuning.max_consecutive_failed_trials}
    if tuning.tuner == "hyperband":
        base, extra = kt.oracles.HyperbandOracle, {"max_epochs": tuning.epochs_per_trial, "factor": 3, "hyperband_iterations": 1}
        why = "Hyperband keeps its own brackets: no trial trains the recipe as it is"
        recipe_values = None
    else:
        if tuning.tuner == "random":
            base, extra = kt.oracles.RandomSearchOracle, {"max_trials": tuning.max_trials}
        else:
            # Keras Tuner's default draws 3 x (dimensions of the space) random points before its Gaussian process
            # proposes any: 27 for the default space, more than max_trials (12), so every "bayesian" search was a
            # random one, the same 12 configurations on every data set. Half random, half proposed.
            base, extra = kt.oracles.BayesianOptimizationOracle, {"max_trials": tuning.max_trials, "num_initial_points": bayesian_initial_points(tuning)}
        why = (f"the first trial is the recipe itself ({format_values(recipe_values)}): the others are ranked against it" if recipe_values
               else "the recipe lies outside tuning.space (or rounds to a neighbour of it): no trial trains it as it is")
    log.info("tuning: %s", why)
    oracle = type(f"Budgeted{base.__name__}", (BudgetMixin, base), {})(**common, **extra)
    oracle.plan = plan
    oracle.recipe_values = recipe_values
    return oracle


@dataclasses.dataclass(frozen=True)
class TrialSetup:
    """What every trial of a search shares: the input shape, classes, pixel statistics and class weights."""

    image_shape: tuple[int, int, int]
    n_classes: int
    n_train: int
    pixel_stats: tuple[float, float]
    class_weights: dict[int, float] | None
    input_normalization: str  # the custom CNN's, decided once as the train stage decides it (`auto` resolved)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrialSetup:
        """From `dataclasses.asdict` through JSON (lists for tuples, string keys for the class weights)."""
        weights = data["class_weights"]
        return cls(tuple(data["image_shape"]), data["n_classes"], data["n_train"], tuple(data["pixel_stats"]),
                   {int(k): float(v) for k, v in weights.items()} if weights is not None else None, data["input_normalization"])


def trial_setup(prepared: Path, recipe: Recipe) -> TrialSetup:
    """Read c02's records once: the same shape, statistics, input normalisation and class weights the train stage uses."""
    records = read_records(prepared)
    channels = 1 if records["color_mode"] == "grayscale" else 3
    rows = [r for r in records["records"] if r["split"] == "train"]
    stats, normalization, _ = training_input([Path(prepared) / r["file"] for r in rows], np.array([r["label_index"] for r in rows]),
                                             recipe.model.custom_cnn.input_normalization)
    return TrialSetup((records["image_size"], records["image_size"], channels), len(records["classes"]), len(rows),
                      stats, recipe_class_weights(records, recipe), normalization)


def recipe_class_weights(records: Mapping[str, Any], recipe: Recipe) -> dict[int, float] | None:
    """The class weights `recipe` trains with on c02's training split (a trial may search their power)."""
    labels = np.array([r["label_index"] for r in records["records"] if r["split"] == "train"])
    return training_class_weights(recipe.train, labels, len(records["classes"]), balanced_sampling(recipe.data_loader.class_sampling, labels))


def build_trial_model(model_name: str, recipe: Recipe, setup: TrialSetup, epochs: int) -> Any:
    """The trial's model, built and compiled like the train stage's (c04 builder, same loss, optimizer and schedule)."""
    # a searched input normalisation wins; otherwise the one the setup decided from the recipe's (`auto` resolved)
    searched = recipe.model.custom_cnn.input_normalization
    model_params = with_input_normalization(recipe.model, setup.input_normalization if searched == "auto" else searched)
    built = builder.build_model(model_name, setup.image_shape, setup.n_classes, model_params, setup.pixel_stats)
    if built.schedule == "two_phase":  # a pretrained backbone: one phase with its top layers trained
        builder.unfreeze_top(built, recipe.model.transfer.fine_tune_layers)
    steps = math.ceil(setup.n_train / recipe.data_loader.batch_size)
    compile_model(built.model, recipe.train, learning_rate(recipe.callbacks, recipe.train.learning_rate, steps, epochs))
    return built.model


def trial_stop(oracle: Any, plan: BudgetPlan | None, recipe_trial: str | None = None) -> float | None:
    """When a trial starting now must stop: the deadline in force now, which the best trial so far may have brought
    forward, so that a trial started just before it does not run on into the finalist's share. Our own oracle (a
    local search's or a chief's) holds `plan` itself (`current_deadline` is this rule); a worker's is a client of the
    chief's, and `plan` is the one its chief announced: the same rule over the same trials (the best and the recipe's
    own, `recipe_trial`), asked of the chief."""
    return plan.trial_deadline(finalist_epoch_seconds(oracle, plan, recipe_trial)) if plan is not None else None


def build_tuner(job: SearchJob, project: Path, plan: BudgetPlan | None) -> Any:
    """A Keras Tuner over `job`, its project in `project` (resumed when it exists), within the budget `plan` (None: no
    deadline). A local search's or a chief's oracle keeps the plan; on a worker, whose oracle is the chief's, `plan` is
    the one its chief announced (`BudgetPlan.announced`), and a trial stops where the chief's would (`trial_stop`).

    Each trial trains in a child process (`python -m metal_defect.components.c07_hyper_tuning.trials`):
    TensorFlow keeps ~12 MB of every fitted graph for the life of a process (clear_session does
    not return it), so in-process trials grow without bound; a child also turns a crash or an
    out-of-memory kill into one failed trial instead of the end of the search.
    """
    kt = _keras_tuner()

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
            stop = trial_stop(self.oracle, plan, recipe_trial)
            resume = values.get("tuner/trial_id")  # hyperband: continue from an earlier bracket's weights
            spec = {"model_name": job.model_name, "recipe": to_plain(job.recipe), "prepared": str(job.prepared), "values": shown_values(values),
                    "setup": dataclasses.asdict(setup),
                    "epochs": int(values.get("tuner/epochs", epochs)), "schedule_epochs": epochs,
                    "initial_epoch": int(values.get("tuner/initial_epoch", 0)), "deadline": stop, "objective": job.tuning.objective,
                    "checkpoint": self._get_checkpoint_fname(trial.trial_id),
                    "resume_from": self._get_checkpoint_fname(resume) if resume else None}
            record = {"trial_id": trial.trial_id, "worker": self.tuner_id, "host": socket.gethostname(), "started": art.now_iso(),
                      "hyperparameters": shown_values(values)}
            started = time.monotonic()
            log.info("trial %s start on %s: %s", trial.trial_id, self.tuner_id, format_values(values))
            try:
                history = run_trial_process(spec, trial_dir)
            except (DataError, ArtifactError) as exc:
                raise kt.errors.FatalError(str(exc)) from exc
            except TrialFailed as exc:
                record |= {"status": "FAILED", "error": str(exc)[:2000], "duration_s": round(time.monotonic() - started, 2), "rss_mb": resident_mb()}
                art.write_json_atomic(trial_dir / TRIAL_RECORD, record)
                log.warning("trial %s FAILED after %.1f s: %s", trial.trial_id, record["duration_s"], str(exc).splitlines()[-1][:300])
                raise kt.errors.FailedTrialError(record["error"]) from exc
            seconds = history.get("epoch_seconds", [])
            if seconds:  # Keras Tuner keeps the best epoch's metrics only: the trial's median epoch time rides along in each
                history[MEDIAN_EPOCH_SECONDS] = [float(np.median(seconds[1:] or seconds))] * len(seconds)
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

    recipe_values = recipe_point(job.recipe, job.tuning, job.model_name, setup.input_normalization)
    oracle = make_oracle(job.tuning, plan, recipe_values)
    recipe_trial = oracle.recipe_trial  # kept here: on a worker Keras Tuner replaces the oracle with the chief's client
    return SearchTuner(oracle=oracle, hypermodel=TrialModel(), directory=str(project.parent),
                       project_name=project.name, overwrite=False)


class TrialFailed(Exception):
    """A trial's child process failed (an error in building or training, a crash, or a kill)."""


TRIAL_SPEC = "trial_spec.json"
TRIAL_RESULT = "trial_result.json"
TRIAL_LOG = "trial.log"


def run_trial_process(spec: dict[str, Any], trial_dir: Path) -> dict[str, list[float]]:
    """Train one trial in a child process; its per-epoch history, or TrialFailed with the child's error."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / TRIAL_RESULT).unlink(missing_ok=True)
    art.write_json_atomic(trial_dir / TRIAL_SPEC, spec)
    package_root = str(Path(__file__).resolve().parents[3])  # the child imports this package from where the parent did
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
    params = dataclasses.replace(recipe.callbacks, tensorboard=False, backup_and_restore=False)
    (trial_dir / HISTORY_CSV).unlink(missing_ok=True)  # a re-run trial starts its log (and its regularisation share) again
    objective = spec["objective"]
    callbacks = fit_callbacks(recipe.train, params, spec["schedule_epochs"], trial_dir, data, checkpoint=False, monitors=(objective,))
    callbacks.append(keras.callbacks.ModelCheckpoint(spec["checkpoint"], monitor=objective, mode=monitor_mode(objective),
                                                        save_best_only=True, save_weights_only=True))
    if spec.get("deadline"):
        callbacks.append(DeadlineStop(spec["deadline"]))
    fit = model.fit(data["train"].dataset, validation_data=data["valid"].dataset, epochs=spec["epochs"], initial_epoch=spec["initial_epoch"],
                    callbacks=callbacks, class_weight=recipe_class_weights(read_records(prepared), recipe), verbose=0, shuffle=False)
    return {k: [float(v) for v in values] for k, values in fit.history.items()}


def _trial_main(argv: list[str]) -> int:
    """`python -m metal_defect.components.c07_hyper_tuning.trials TRIAL_DIR`: one trial, result in TRIAL_DIR/trial_result.json."""
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


if __name__ == "__main__":
    sys.exit(_trial_main(sys.argv[1:]))
