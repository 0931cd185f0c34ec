"""Stage 5, `tune`: a Keras Tuner search (c07) around the best base model, the tuned model judged like the base models (c06)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from metal_defect import artifacts as art
from metal_defect.components.c06_evaluation.evaluate import BEST_FILE, evaluate_models
from metal_defect.components.c07_hyper_tuning.distributed import search
from metal_defect.components.c07_hyper_tuning.report import base_objective, plot_trials, save_tuned_model, trial_rows, write_trials_csv
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
    """Runner entry: search, then write and evaluate the tuned model (or record that tuning is off)."""
    if not tuning.enabled:
        art.write_json_atomic(io.out_dir / SEARCH_FILE, {"enabled": False})
        log.info("tuning.enabled is false: no search; the base model competes alone")
        return {"enabled": False}
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
    values = shown_values(best.hyperparameters.values)
    art.write_json_atomic(out / BEST_HP_FILE, {"trial_id": best.trial_id, "score": best.score, "objective": job.tuning.objective,
                                               "hyperparameters": values})
    tuned_name = save_tuned_model(tuner, best, job, project, out)
    summary |= {"best_hyperparameters": values, "best_trial": best.trial_id, "best_score": best.score, "tuned_model": tuned_name}
    art.write_json_atomic(out / SEARCH_FILE, summary)
    log.info("tuning: %d trials completed, %d failed; best trial %s (%s %.5f): %s", len(completed), len(failed), best.trial_id,
             job.tuning.objective, best.score, format_values(values))
    result = evaluate_models(art.read_json(io.inputs["data_ingestion"] / INGESTION_REPORT), job.prepared, out, evaluation, out / EVALUATION_DIR, run_id=io.run_id, limits=limits,
                             extensions=tuple(schema.extensions), kind="tuned")
    metrics = {f"tuned_{k}": v for k, v in result["metrics"].items() if k != "best_model"}
    return {"enabled": True, "trials_completed": len(completed), "trials_failed": len(failed), "best_hyperparameters": values,
            "metrics": metrics}
