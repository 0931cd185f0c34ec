"""c07 report: the trials table and plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from metal_defect import artifacts as art
from metal_defect.components.c05_callbacks import best_of
from metal_defect.components.c06_training import HISTORY_FILE, MODELS_DIR
from metal_defect.components.c07_hyper_tuning.space import shown_values
from metal_defect.components.c07_hyper_tuning.trials import TRIAL_RECORD
from metal_defect.plots import tuning_trials


def trial_rows(tuner: Any, project: Path, objective: str) -> list[dict[str, Any]]:
    """Every trial: id, status, objective, duration, worker, error, whether it is the recipe itself, and hyperparameters
    (oracle + our trial records)."""
    rows = []
    for trial_id, trial in sorted(tuner.oracle.trials.items()):
        record_path = project / f"trial_{trial_id}" / TRIAL_RECORD
        record = art.read_json(record_path) if record_path.is_file() else {}
        status = str(trial.status)
        rows.append({"trial_id": trial_id, "status": status, "objective": objective,
                     "score": trial.score if trial.score is not None and status == "COMPLETED" else None,
                     "best_epoch": trial.best_step if status == "COMPLETED" else None, "duration_s": record.get("duration_s"),
                     "worker": record.get("worker"), "host": record.get("host"), "rss_mb": record.get("rss_mb"), "error": record.get("error", ""),
                     "recipe": tuner.oracle.is_recipe(trial.hyperparameters.values),
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
