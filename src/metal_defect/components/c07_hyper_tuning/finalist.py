"""c07 finalist: how the tuning budget is split between the search and the full training of its best
configuration, and that training.

A trial is short on purpose: it only ranks configurations. Its checkpoint would compete with a base
model trained over the whole schedule and almost never win, so the best configuration is trained
again from scratch with the train stage's own schedule (c06), inside the same budget.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from metal_defect import artifacts as art
from metal_defect.components import c04_model_builder as builder
from metal_defect.components.c03_dataset_loader import build_datasets
from metal_defect.components.c06_training import TRAIN_SUMMARY, schedule_epochs, train_models
from metal_defect.components.c07_hyper_tuning.space import SearchJob, apply_hyperparameters, shown_values
from metal_defect.config import EvaluationParams, TrainParams, TuningParams, fingerprint_of

log = logging.getLogger(__name__)

TUNED_SUFFIX = "_tuned"
TRIAL_START_S = 20.0  # a trial's child process: TensorFlow's import, the data pipeline, the first graph


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
    """tuning.max_minutes split into the search and the finalist's training (times are time.time())."""

    started: float
    total_s: float
    finalist_s: float  # expected: as long as the base model's training took
    trial_s: float  # expected: one trial of tuning.epochs_per_trial epochs at the base model's epoch time
    finalist_epochs: int = 0  # the base model's epochs: the full schedule the finalist trains
    base_epoch_s: float = 0.0  # the base model's median epoch in the train stage (0: unknown, e.g. an older chief's plan)

    @classmethod
    def announced(cls, active: Mapping[str, Any]) -> BudgetPlan | None:
        """A worker's plan: the one its chief announced in `active` (None when the chief has no budget). An older
        chief announced only its search deadline: then that, never brought forward."""
        if active.get("plan"):
            return cls(**active["plan"])
        if not active.get("deadline"):
            return None
        now = time.time()
        return cls(now, max(active["deadline"] - now, 0.0), 0.0, 0.0)

    @property
    def search_deadline(self) -> float:
        return self.started + max(self.total_s - self.finalist_s, 0.0)

    def trial_deadline(self, best_epoch_s: float | None) -> float:
        """No trial starts after this: the search deadline, brought forward when the best configuration so far trains
        an epoch in `best_epoch_s` (`finalist_epoch_seconds`) and so needs longer than the base model for the full schedule. On
        magnetic tiles (2026-12-07) a 1.5-times-wider finalist got the base model's 7.7 minutes and was stopped after
        26 of its 50 epochs, its learning rate not yet decayed."""
        if not best_epoch_s or not self.finalist_epochs:
            return self.search_deadline
        return min(self.search_deadline, self.end - (best_epoch_s * self.finalist_epochs + TRIAL_START_S))

    @property
    def end(self) -> float:
        return self.started + self.total_s

    @property
    def search_fits(self) -> bool:
        """Whether the search's share holds at least one trial."""
        return self.total_s - self.finalist_s >= self.trial_s

    def text(self) -> str:
        """How the budget will be spent, for the log (said before the search starts)."""
        def clock(t: float) -> str:
            return dt.datetime.fromtimestamp(t).strftime("%H:%M:%S")

        search_s = max(self.total_s - self.finalist_s, 0.0)
        return (f"budget {self.total_s / 60:.1f} min: the search until {clock(self.search_deadline)} ({search_s / 60:.1f} min, "
                f"~{search_s / self.trial_s:.0f} trial(s) of ~{self.trial_s / 60:.1f} min), then its best configuration trained with "
                f"the full schedule (~{self.finalist_s / 60:.1f} min, as long as the base model took), stopped at {clock(self.end)} at the latest")


def plan_budget(tuning: TuningParams, base_training: Mapping[str, Any], started: float) -> BudgetPlan:
    """The plan for a search around a base model whose train-stage record is `base_training`."""
    epoch_s = float(base_training.get("median_epoch_seconds") or 0.0)
    epochs = int(base_training.get("epochs_run") or 0)
    return BudgetPlan(started, tuning.max_minutes * 60.0, epoch_s * epochs + TRIAL_START_S, epoch_s * tuning.epochs_per_trial + TRIAL_START_S, epochs,
                      epoch_s)


def search_needed(tuning: TuningParams, best: Mapping[str, Any], evaluation: EvaluationParams) -> tuple[bool, str]:
    """Whether to search (tuning.enabled: true, false or auto), and why: auto searches only when the base model
    leaves room, flagged weak_model or below evaluation.gate_good_macro_f1 on validation."""
    if tuning.enabled is True:
        return True, "tuning.enabled is true"
    if tuning.enabled is False:
        return False, "tuning.enabled is false"
    valid_f1 = best["valid"]["macro_f1"]
    if best.get("weak_model"):
        return True, f"tuning.enabled is auto and the base model {best['name']} is flagged weak_model"
    if valid_f1 < evaluation.gate_good_macro_f1:
        return True, f"tuning.enabled is auto and the base model's validation macro F1 {valid_f1:.4f} is below {evaluation.gate_good_macro_f1:g}"
    return False, (f"tuning.enabled is auto and the base model {best['name']} leaves little room (validation macro F1 {valid_f1:.4f}, "
                   f"not weak): no search; set tuning.enabled=true to search anyway")


def finalist_work_dir(work_dir: Path, values: Mapping[str, Any]) -> Path:
    """Where the finalist with these hyperparameters trains and resumes. Keyed by them: a search resumed after
    its trials changed (another `paths.tuning`, a changed oracle) may pick another configuration, which must
    start from scratch, not from the interrupted finalist's weights and epoch (found on the proxy, 2026-12-06)."""
    return work_dir / fingerprint_of(shown_values(values))[:12]


def schedule_that_fits(train: TrainParams, steps_per_epoch: int, epoch_s: float | None, seconds: float, fixed_epochs: int = 0) -> TrainParams:
    """`train`, its schedule shortened to the epochs that fit in `seconds` at `epoch_s` each when the full one does not
    (`fixed_epochs`: a later phase's, which stay): the learning rate then decays over the epochs there is time for.
    A finalist stopped by the budget mid-schedule never decays it: on the proxy (2026-12-07) the best trial, twice as
    slow as the base model, was found as the search ended and got 87 of its 100 epochs."""
    if not epoch_s:
        return train
    full = schedule_epochs(train, steps_per_epoch)
    fits = max(int((seconds - TRIAL_START_S) // epoch_s) - fixed_epochs, 1)
    if fits >= full:
        return train
    if fits >= train.epochs:  # min_steps raised the epochs: lower it to what fits, so the patience still scales with them
        return dataclasses.replace(train, min_steps=fits * steps_per_epoch)
    return dataclasses.replace(train, epochs=fits, min_steps=0)


def train_finalist(job: SearchJob, values: Mapping[str, Any], trial_id: str, work_dir: Path, out: Path, deadline: float,
                   epoch_s: float | None = None) -> dict[str, Any]:
    """Train `values` (the best trial's) from scratch with the train stage's full schedule, into `out` laid out like a
    train-stage output (models/<name>_tuned/, train_summary.json), so that c06 evaluates it like a base model.
    When the full schedule at `epoch_s` (the best trial's epoch time) no longer fits before `deadline`, a shorter one
    that does (`schedule_that_fits`). An interrupted run resumes in `finalist_work_dir`: only the same configuration
    resumes. Returns its train-stage record, with `schedule_epochs` (the full schedule's), `fitted_epochs` and
    `stopped_by_budget`."""
    recipe = apply_hyperparameters(job.recipe, values)
    data = build_datasets(job.prepared, recipe.data_loader, recipe.base.seed)
    train = dataclasses.replace(recipe.train, models=[job.model_name])
    steps = data.steps("train")
    fixed = recipe.model.transfer.fine_tune_epochs if job.model_name != builder.CUSTOM else 0
    full = schedule_epochs(train, steps)
    train = schedule_that_fits(train, steps, epoch_s, deadline - time.time(), fixed)
    fitted = schedule_epochs(train, steps)
    if fitted < full:
        log.info("tuning: the finalist's full schedule (%d epochs at ~%.1f s) does not fit the %.1f min left: %d epochs, the learning rate "
                 "decaying over them", full, epoch_s, (deadline - time.time()) / 60, fitted)
    # a shortened schedule is another training: it resumes only as itself
    where = finalist_work_dir(work_dir, values if fitted == full else {**values, "fitted_epochs": fitted})
    train_models(data, recipe.base, recipe.model, recipe.callbacks, train, where, out,
                 saved_suffix=TUNED_SUFFIX, deadline=deadline)
    summary = art.read_json(out / TRAIN_SUMMARY)
    name = job.model_name + TUNED_SUFFIX
    # the budget stopped it only if it ended short of its schedule; one that trained every fitted epoch may end just after
    stopped = summary["models"][name]["epochs_run"] < fitted and time.time() >= deadline
    summary["models"][name] |= {"trial_id": trial_id, "hyperparameters": shown_values(values), "schedule_epochs": full, "fitted_epochs": fitted,
                                "stopped_by_budget": stopped,
                                "schedule": f"{summary['models'][name]['schedule']}, the best trial's configuration retrained"}
    art.write_json_atomic(out / TRAIN_SUMMARY, summary)
    return summary["models"][name]
