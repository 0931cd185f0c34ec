"""Stage 5, `tune`: a Keras Tuner search (c07) ranks configurations around the best base model; the best one is trained
with the full schedule and judged like the base models (c06)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from metal_defect import artifacts as art
from metal_defect.components.c06_evaluation.evaluate import BEST_FILE, evaluate_models
from metal_defect.components.c06_training import TRAIN_SUMMARY
from metal_defect.components.c07_hyper_tuning.distributed import search
from metal_defect.components.c07_hyper_tuning.finalist import BudgetPlan, plan_budget, search_needed, train_finalist
from metal_defect.components.c07_hyper_tuning.report import base_objective, plot_trials, trial_rows, write_trials_csv
from metal_defect.components.c07_hyper_tuning.space import SearchJob, data_fingerprint, format_values, shown_values
from metal_defect.config import (
    BaseParams,
    CallbacksParams,
    DataLoaderParams,
    DataPreprocessingParams,
    EvaluationParams,
    ModelParams,
    Recipe,
    SchemaConfig,
    TrainParams,
    TuningParams,
)
from metal_defect.stages.s1_data_ingestion import REPORT_FILE as INGESTION_REPORT

log = logging.getLogger(__name__)

SEARCH_FILE = "search.json"
TRIALS_CSV = "trials.csv"
TRIALS_PLOT = "trials.png"
BEST_HP_FILE = "best_hyperparameters.json"
EVALUATION_DIR = "evaluation"  # the tuned model's evaluation, laid out like the evaluation stage's output


def run_stage(io: Any, *, base: BaseParams, data_loader: DataLoaderParams, model: ModelParams, callbacks: CallbacksParams,
              train: TrainParams, tuning: TuningParams, evaluation: EvaluationParams, data_preprocessing: DataPreprocessingParams,
              schema: SchemaConfig) -> dict[str, Any]:
    """Runner entry: rank configurations with a search, train the best one with the full schedule and evaluate it
    (or record why there was no search)."""
    started = time.time()
    best_base = art.read_json(io.inputs["evaluation"] / BEST_FILE)
    wanted, why = search_needed(tuning, best_base, evaluation)
    if not wanted:
        art.write_json_atomic(io.out_dir / SEARCH_FILE, {"enabled": False, "reason": why})
        log.info("%s; the base model competes alone", why)
        return {"enabled": False, "reason": why}
    name = best_base["name"] if tuning.model == "best" else tuning.model
    if name not in train.models and tuning.model != "best":
        log.info("tuning.model %s is not in train.models: it is tuned from scratch and competes with the base models", name)
    base_training = art.read_json(io.inputs["train"] / TRAIN_SUMMARY)["models"].get(name, {})
    plan = plan_budget(tuning, base_training, started)
    log.info("tuning (%s): %s", why, plan.text())
    if not plan.search_fits:
        reason = (f"tuning.max_minutes={tuning.max_minutes:g} does not cover one trial (~{plan.trial_s / 60:.1f} min) beside the "
                  f"finalist's full training (~{plan.finalist_s / 60:.1f} min): no search; raise tuning.max_minutes")
        log.warning(reason)
        art.write_json_atomic(io.out_dir / SEARCH_FILE, {"enabled": True, "skipped": reason, "trials_completed": 0, "trials_failed": 0})
        return {"enabled": True, "trials_completed": 0, "trials_failed": 0, "skipped": reason}
    prepared = io.inputs["data_preprocessing"]
    job = SearchJob(name, Recipe(base, data_loader, model, callbacks, train), tuning, prepared, data_fingerprint(prepared))
    project = Path(io.tuning_dir) / job.key
    tuner = search(job, project, plan)
    return write_results(io, tuner, job, project, plan, evaluation, data_preprocessing, schema)


def write_results(io: Any, tuner: Any, job: SearchJob, project: Path, plan: BudgetPlan, evaluation: EvaluationParams,
                  limits: DataPreprocessingParams, schema: SchemaConfig) -> dict[str, Any]:
    """trials.csv and plot, best hyperparameters, the best configuration trained with the full schedule, its evaluation."""
    out = io.out_dir
    rows = trial_rows(tuner, project, job.tuning.objective)
    write_trials_csv(rows, out / TRIALS_CSV)
    completed = [r for r in rows if r["score"] is not None]
    failed = [r for r in rows if r["status"] in ("FAILED", "INVALID")]
    if rows:
        plot_trials(rows, job.tuning.objective, out / TRIALS_PLOT, base_objective(io.inputs["train"], job.model_name, job.tuning.objective))
    search_seconds = time.time() - plan.started
    summary: dict[str, Any] = {"enabled": True, "model": job.model_name, "tuner": job.tuning.tuner, "objective": job.tuning.objective,
                               "project": str(project), "search_seconds_this_run": round(search_seconds, 1), "trials_completed": len(completed),
                               "trials_failed": len(failed), "best_hyperparameters": None, "tuned_model": None,
                               "budget": {"max_minutes": job.tuning.max_minutes, "planned_finalist_minutes": round(plan.finalist_s / 60, 2),
                                          "planned_search_minutes": round((plan.search_deadline - plan.started) / 60, 2)},
                               "tuned_model_source": "the best trial's configuration, trained from scratch with the train stage's full schedule"}
    best_trials = tuner.oracle.get_best_trials(1) if completed else []
    if not best_trials:
        log.warning("tuning: no trial completed (%d failed); the base model competes alone", len(failed))
        art.write_json_atomic(out / SEARCH_FILE, summary)
        return {"enabled": True, "trials_completed": 0, "trials_failed": len(failed)}
    best = best_trials[0]
    values = shown_values(best.hyperparameters.values)
    art.write_json_atomic(out / BEST_HP_FILE, {"trial_id": best.trial_id, "score": best.score, "objective": job.tuning.objective,
                                               "hyperparameters": values})
    if tuner.oracle.is_recipe(values):
        # retrained, the recipe's own point is the base model again: the finalist's minutes would buy nothing
        why = (f"no configuration ranked above the recipe itself (trial {best.trial_id}, {job.tuning.objective} {best.score:.5f}) in "
               f"{len(completed)} trials: nothing to retrain; the base model competes alone")
        log.info("tuning: %s", why)
        summary |= {"best_hyperparameters": values, "best_trial": best.trial_id, "best_score": best.score, "finalist_skipped": why,
                    "tuned_model_source": f"none ({why})"}
        art.write_json_atomic(out / SEARCH_FILE, summary)
        return {"enabled": True, "trials_completed": len(completed), "trials_failed": len(failed), "best_hyperparameters": values,
                "finalist_skipped": why}
    log.info("tuning: %d trials completed, %d failed in %.1f min; best trial %s (%s %.5f): %s; training it with the full schedule "
             "(until %s at the latest)", len(completed), len(failed), search_seconds / 60, best.trial_id, job.tuning.objective, best.score,
             format_values(values), time.strftime("%H:%M:%S", time.localtime(plan.end)))
    finalist_started = time.time()
    info = train_finalist(job, values, best.trial_id, io.work_dir / "finalist", out, plan.end, tuner.oracle.finalist_epoch_seconds())
    finalist_seconds = time.time() - finalist_started
    log.info("tuning: the finalist %s trained %d of its %d epochs in %.1f min (planned ~%.1f)%s", info["name"], info["epochs_run"],
             info["fitted_epochs"], finalist_seconds / 60, plan.finalist_s / 60, "; stopped by the budget" if info["stopped_by_budget"] else "")
    summary |= {"best_hyperparameters": values, "best_trial": best.trial_id, "best_score": best.score, "tuned_model": info["name"],
                "finalist_seconds": round(finalist_seconds, 1), "finalist_epochs": info["epochs_run"],
                "finalist_stopped_by_budget": info["stopped_by_budget"]}
    art.write_json_atomic(out / SEARCH_FILE, summary)
    result = evaluate_models(art.read_json(io.inputs["data_ingestion"] / INGESTION_REPORT), job.prepared, out, evaluation, out / EVALUATION_DIR, run_id=io.run_id, limits=limits,
                             extensions=tuple(schema.extensions), kind="tuned")
    metrics = {f"tuned_{k}": v for k, v in result["metrics"].items() if k != "best_model"}
    return {"enabled": True, "trials_completed": len(completed), "trials_failed": len(failed), "best_hyperparameters": values,
            "metrics": metrics}
