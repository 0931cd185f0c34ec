"""c07 report: the trials table and plot, and the best trial's model written like a train-stage output."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from metal_defect import artifacts as art
from metal_defect.components.c03_dataset_loader import read_records
from metal_defect.components.c04_model_builder import CUSTOM, parameter_counts
from metal_defect.components.c05_callbacks import HISTORY_CSV, best_of, read_history
from metal_defect.components.c06_training import HISTORY_FILE, MODELS_DIR, TRAIN_SUMMARY, TRAINED_MODEL
from metal_defect.components.c07_hyper_tuning.space import SearchJob, shown_values
from metal_defect.components.c07_hyper_tuning.trials import TRIAL_RECORD
from metal_defect.plots import tuning_trials


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
                     **{f"hp_{k}": v for k, v in shown_values(trial.hyperparameters.values).items()}})
    return rows


def write_trials_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row)) or ["trial_id"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def most_influential(rows: list[dict[str, Any]]) -> tuple[str | None, float]:
    """The hyperparameter whose values rank-correlate most with the score over completed trials (|Spearman rho|)."""
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
    influential, rho = most_influential(rows)
    return tuning_trials(rows, objective, influential, rho, path, base_value)


def base_objective(trained: Path, model_name: str, objective: str) -> float | None:
    """The base model's best value of the objective over its training epochs (None when not recorded)."""
    history_file = Path(trained) / MODELS_DIR / model_name / HISTORY_FILE

    return best_of([row[objective] for row in (json.loads(history_file.read_text()) if history_file.is_file() else []) if objective in row], objective)


TUNED_SUFFIX = "_tuned"


def save_tuned_model(tuner: Any, best: Any, job: SearchJob, project: Path, out: Path) -> str:
    """Write the best trial's best-epoch checkpoint (not retrained) into `out` laid out like a train-stage
    output (models/<name>_tuned/, train_summary.json), so that c06 evaluates it like a base model. Returns its name."""
    tuned_name = job.model_name + TUNED_SUFFIX
    target = out / MODELS_DIR / tuned_name
    target.mkdir(parents=True)
    tuned = tuner.load_model(best)
    tuned.save(target / TRAINED_MODEL)
    history = [{**row, "phase": "trial", "global_epoch": i + 1} for i, row in enumerate(read_history(project / f"trial_{best.trial_id}" / HISTORY_CSV))]
    (target / HISTORY_FILE).write_text(json.dumps(history, indent=1))
    transfer_weights = job.recipe.model.transfer.weights
    pretrained = job.model_name != CUSTOM and transfer_weights != "none"
    seconds_per_epoch = [row["epoch_seconds"] for row in history[1:] if "epoch_seconds" in row]
    info = {"name": tuned_name, "pretrained": pretrained, "weights": transfer_weights if pretrained else "random",
            "schedule": "one tuning trial", "phases": ["trial"], "epochs_run": len(history),
            "median_epoch_seconds": round(float(np.median(seconds_per_epoch)), 3) if seconds_per_epoch else None,
            "strategy": "default (one device)", "replicas": 1, "trial_id": best.trial_id, "hyperparameters": shown_values(best.hyperparameters.values),
            "parameters": parameter_counts(tuned)}
    art.write_json_atomic(out / TRAIN_SUMMARY, {"models": {tuned_name: info}, "class_names": read_records(job.prepared)["classes"],
                                                "image_shape": list(tuned.input_shape[1:])})
    return tuned_name
