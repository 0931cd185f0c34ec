"""c06 evaluate: judge every trained model on validation, choose one, bundle it, report it once on test."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from metal_defect import metrics, plots
from metal_defect.artifacts import read_json, write_json_atomic
from metal_defect.components.c02_data_preprocessing import RECORDS_FILE
from metal_defect.components.c02_data_preprocessing import REPORT_FILE as PREPROCESSING_REPORT
from metal_defect.components.c06_evaluation.gate import quality_gate
from metal_defect.components.c06_evaluation.heatmaps import choose_heatmap_layer, pointing_report
from metal_defect.components.c06_evaluation.model_card import model_card
from metal_defect.components.c06_evaluation.scores import (
    calibrate,
    calibration_summary,
    choose_best,
    headline,
    load_split,
    report_split,
    served_answers,
)
from metal_defect.components.c06_evaluation.verdicts import fit_verdicts, verdict_counts
from metal_defect.components.c06_training import HISTORY_FILE, MODELS_DIR, TRAIN_SUMMARY, TRAINED_MODEL
from metal_defect.config import DataPreprocessingParams, EvaluationParams
from metal_defect.review import REVIEWED_EVAL_EVERY, REVIEWED_SPLIT
from metal_defect.serving.bundle import (
    BUNDLE_DIR,
    MODEL_CARD,
    MODEL_FILE,
    ServingSpec,
    load_model,
    write_manifest,
    write_ood_references,
    write_spec,
)
from metal_defect.serving.bundle import METRICS_FILE as BUNDLE_METRICS
from metal_defect.serving.predictor import Predictor

log = logging.getLogger(__name__)


def metrics_files(kind: str) -> tuple[str, str]:
    """(all models' metrics, the chosen model's record) file names for base or tuned models."""
    return f"{kind}_models_metrics.json", f"best_{kind}_model.json"


BEST_FILE = metrics_files("base")[1]
GATE_FILE = "quality_gate.json"


@dataclasses.dataclass
class Chosen:
    """The model chosen on validation, and what the later steps need of it."""

    name: str
    model_dir: Path
    spec: ServingSpec
    valid_probs: np.ndarray


def evaluate_models(ingestion: dict[str, Any], prepared: Path, trained: Path, params: EvaluationParams, out_dir: Path, run_id: str | None = None,
                    limits: DataPreprocessingParams | None = None, extensions: tuple[str, ...] = (), kind: str = "base") -> dict[str, Any]:
    """Score every trained model on validation through the predictor, choose one, fit its verdict
    thresholds, write the bundle, and report the chosen model once on test.

    `ingestion` is the ingestion report (for the model card); `trained` is a folder laid out like
    the train stage's output (the tune stage writes its tuned model the same way, with
    kind="tuned": tuned_models_metrics.json, best_tuned_model.json).
    """
    metrics_file, best_file = metrics_files(kind)
    train_summary = read_json(trained / TRAIN_SUMMARY)
    class_names = train_summary["class_names"]
    records = read_json(prepared / RECORDS_FILE)
    x_valid, y_valid, valid_names = load_split(prepared, "valid")
    results, chosen = score_on_validation(train_summary, records, trained, (x_valid, y_valid, valid_names), params, out_dir, run_id, limits,
                                          extensions, kind)
    best = chosen.name
    temperature, calibration = calibrate(y_valid, chosen.valid_probs, params)
    x_train, y_train, _ = load_split(prepared, "train")
    spec, verdicts = write_bundle(chosen, temperature, records, (x_train, x_valid, y_valid), params, out_dir / BUNDLE_DIR)

    served = Predictor.from_bundle(out_dir / BUNDLE_DIR)
    test_report, test_answers = report_test(served, prepared, records, class_names, best, params, out_dir)
    if test_report:
        verdicts["test"] = test_report["verdicts"]
        split, (y_eval, predicted, x_eval) = "test", test_answers
    else:  # no test split: the gate judges on validation
        split, y_eval, predicted, x_eval = "valid", y_valid, chosen.valid_probs.argmax(axis=1), x_valid
    gate = quality_gate(served, x_train, y_train, class_names, split, y_eval, predicted, x_eval, chosen.model_dir, params)
    write_json_atomic(out_dir / GATE_FILE, gate)
    results[best]["calibration"] = calibration
    results[best]["verdicts"] = verdicts
    write_json_atomic(out_dir / metrics_file, {"selected_by": f"validation {params.select_metric}, ties by validation log loss",
                                               "models": results})
    best_record = {"name": best, "model": f"{BUNDLE_DIR}/{MODEL_FILE}", "bundle": BUNDLE_DIR, "temperature": temperature,
                   "pretrained": results[best]["pretrained"], "valid": headline(results[best]["valid"]),
                   "test": headline(test_report) if test_report else None, "calibration": calibration,
                   "weak_model": gate["weak_model"], "weak_reasons": gate["reasons"], "verdicts": verdicts,
                   "pointing": test_report.get("pointing") if test_report else None,
                   # per validation image, in the prepared split's order: the select stage sets a tuned model beside the base one image by image
                   "valid_answers": {"classes": len(class_names), "labels": y_valid.tolist(),
                                     "predicted": chosen.valid_probs.argmax(axis=1).tolist()}}
    reviewed = report_reviewed(served, prepared, class_names, best, params, out_dir)
    best_record["reviewed"] = headline(reviewed) if reviewed else None
    write_json_atomic(out_dir / best_file, best_record)
    card = model_card(best, results[best], test_report, calibration, spec, ingestion, read_json(prepared / PREPROCESSING_REPORT),
                      train_summary["models"][best], gate, verdicts)
    if reviewed:
        card += (f"\n## On the reviewed slice\n\nReviewed images kept out of training (one in {REVIEWED_EVAL_EVERY}, by sha256): "
                 f"{metrics.caption(reviewed['n'], reviewed['errors'])}, macro F1 {reviewed['macro_f1']:.4f}, flagged "
                 f"{100 * reviewed['verdicts']['flagged_share']:.1f} %. `python main.py compare RUN_A RUN_B` sets it beside another run's model.\n")
    finish_bundle(out_dir, card, best_record, gate, spec)
    summary = headline_metrics(best, results[best]["valid"], gate, spec, test_report)
    if reviewed:
        summary |= {"reviewed_accuracy": reviewed["accuracy"], "reviewed_macro_f1": reviewed["macro_f1"], "reviewed_n": reviewed["n"]}
    return {"metrics": summary, "temperature": temperature}


def report_reviewed(served: Predictor, prepared: Path, class_names: list[str], best: str, params: EvaluationParams,
                    out_dir: Path) -> dict[str, Any] | None:
    """The chosen model on the reviewed evaluation slice (reviewed images kept out of training); None without one."""
    x_rev, y_rev, names = load_split(prepared, REVIEWED_SPLIT)
    if not len(y_rev):
        return None
    _, probs, answers = served_answers(served, x_rev, names, params.batch_size)
    report = report_split(y_rev, probs, class_names, x_rev, names, out_dir / REVIEWED_SPLIT, f"{best}, reviewed slice", params,
                          present_classes_only=True)
    report["verdicts"] = verdict_counts(answers, y_rev, class_names)
    log.info("reviewed slice (%s): %s, macro F1 %.4f", best, metrics.caption(report["n"], report["errors"]), report["macro_f1"])
    return report


def score_on_validation(train_summary: dict[str, Any], records: dict[str, Any], trained: Path, valid: tuple[np.ndarray, np.ndarray, list[str]],
                        params: EvaluationParams, out_dir: Path, run_id: str | None, limits: DataPreprocessingParams | None,
                        extensions: tuple[str, ...], kind: str) -> tuple[dict[str, Any], Chosen]:
    """Every trained model's validation report (with its training curves), and the one chosen on validation."""
    x_valid, y_valid, valid_names = valid
    class_names = train_summary["class_names"]
    results: dict[str, Any] = {}
    specs: dict[str, ServingSpec] = {}
    valid_probs: dict[str, np.ndarray] = {}
    for name, info in train_summary["models"].items():
        model_dir = trained / MODELS_DIR / name
        specs[name] = ServingSpec(model_name=name, class_names=tuple(class_names), image_size=records["image_size"], color_mode=records["color_mode"],
                                  resize=records["resize"], pretrained=info["pretrained"], run_id=run_id,
                                  max_image_pixels=limits.max_image_pixels if limits else 40_000_000, max_file_mb=limits.max_file_mb if limits else 50.0,
                                  extensions=extensions or ServingSpec.extensions)
        valid_probs[name] = Predictor(load_model(model_dir / TRAINED_MODEL), specs[name]).raw_probabilities(x_valid, params.batch_size)
        folder = out_dir / "models" / name
        results[name] = {"valid": report_split(y_valid, valid_probs[name], class_names, x_valid, valid_names, folder, f"{name}, validation", params),
                         "pretrained": info["pretrained"], "schedule": info["schedule"], "epochs_run": info["epochs_run"]}
        history = read_json(model_dir / HISTORY_FILE) if (model_dir / HISTORY_FILE).is_file() else []
        if history:
            plots.training_curves(history, f"{name}: training curves ({info['epochs_run']} epochs, {info['schedule']})",
                                  metrics.caption(results[name]["valid"]["n"], results[name]["valid"]["errors"]), folder / "training_curves.png")
    best = choose_best(results, params.select_metric)
    log.info("best %s model on validation: %s (%s %.4f)", kind, best, params.select_metric, results[best]["valid"][params.select_metric])
    return results, Chosen(best, trained / MODELS_DIR / best, specs[best], valid_probs[best])


def write_bundle(chosen: Chosen, temperature: float, records: dict[str, Any], data: tuple[np.ndarray, np.ndarray, np.ndarray],
                 params: EvaluationParams, bundle: Path) -> tuple[ServingSpec, dict[str, Any]]:
    """The chosen model's bundle with its temperature, verdict thresholds, OOD references and heatmap layer
    (its card and metrics come last, in `finish_bundle`). Returns the spec and the verdicts record."""
    x_train, x_valid, y_valid = data
    predictor = Predictor(load_model(chosen.model_dir / TRAINED_MODEL), dataclasses.replace(chosen.spec, temperature=temperature))
    spec, scorer, verdicts = fit_verdicts(predictor, x_train, x_valid, y_valid, params)
    bundle.mkdir(parents=True)
    shutil.copy2(chosen.model_dir / TRAINED_MODEL, bundle / MODEL_FILE)
    write_ood_references(bundle, scorer)
    valid_records = [r for r in records["records"] if r["split"] == "valid"]
    layer, verdicts["heatmap"] = choose_heatmap_layer(predictor, x_valid, chosen.valid_probs.argmax(axis=1), valid_records, params.annotations, params.masks)
    spec = dataclasses.replace(spec, created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), heatmap_layer=layer)
    write_spec(bundle, spec)
    write_manifest(bundle)
    return spec, verdicts


def report_test(served: Predictor, prepared: Path, records: dict[str, Any], class_names: list[str], best: str, params: EvaluationParams,
                out_dir: Path) -> tuple[dict[str, Any] | None, tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
    """The served bundle's one look at the test split: its report (metrics, verdicts, pointing accuracy) and,
    for the quality gate, (true labels, predicted labels, images); (None, None) without a test split."""
    x_test, y_test, test_names = load_split(prepared, "test")
    if not len(y_test):
        return None, None
    raw_test, probs, answers = served_answers(served, x_test, test_names, params.batch_size)
    report = report_split(y_test, probs, class_names, x_test, test_names, out_dir / "test",
                          f"{best}, test split (chosen on validation)", params)
    report["calibration_uncalibrated"] = calibration_summary(y_test, raw_test, params)
    report["verdicts"] = verdict_counts(answers, y_test, class_names)
    test_records = [r for r in records["records"] if r["split"] == "test"]
    pointing = pointing_report(served, x_test, test_records, raw_test.argmax(axis=1), class_names, params.annotations, out_dir / "test", params.masks)
    if pointing:
        report["pointing"] = pointing
    return report, (y_test, raw_test.argmax(axis=1), x_test)


def finish_bundle(out_dir: Path, card: str, best_record: dict[str, Any], gate: dict[str, Any], spec: ServingSpec) -> None:
    """The bundle is complete only with its card, metrics and the weak-model flag: write them, then spec and manifest last."""
    bundle = out_dir / BUNDLE_DIR
    (out_dir / MODEL_CARD).write_text(card, encoding="utf-8")
    (bundle / MODEL_CARD).write_text(card, encoding="utf-8")
    write_json_atomic(bundle / BUNDLE_METRICS, {k: best_record.get(k) for k in ("name", "valid", "test", "calibration", "verdicts", "pointing", "reviewed")} | {"quality_gate": gate})
    write_spec(bundle, dataclasses.replace(spec, weak_model=gate["weak_model"], weak_reasons=tuple(gate["reasons"])))
    write_manifest(bundle)


def headline_metrics(best: str, valid: dict[str, Any], gate: dict[str, Any], spec: ServingSpec, test_report: dict[str, Any] | None) -> dict[str, Any]:
    """The numbers the run manifest and `runs` show (and log the test split's line)."""
    result = {"best_model": best, "valid_accuracy": valid["accuracy"], "valid_macro_f1": valid["macro_f1"],
              "weak_model": gate["weak_model"], "classical_macro_f1": gate["classical"]["macro_f1"], "majority_macro_f1": gate["majority"]["macro_f1"],
              "uncertain_threshold": spec.uncertain_threshold}
    if not test_report:
        return result
    result |= {"test_accuracy": test_report["accuracy"], "test_macro_f1": test_report["macro_f1"], "test_errors": test_report["errors"],
               "test_n": test_report["n"], "test_ece": test_report["calibration"]["ece"],
               "test_flagged_share": test_report["verdicts"]["flagged_share"]}
    if test_report.get("pointing"):
        result |= {"pointing_strict": test_report["pointing"]["overall"]["strict"],
                   "pointing_tolerant": test_report["pointing"]["overall"]["tolerant"]}
    log.info("test split (%s): %s, macro F1 %.4f; flagged %.1f %% (uncertain %d, out of distribution %d)", best,
             metrics.caption(test_report["n"], test_report["errors"]), test_report["macro_f1"],
             100 * test_report["verdicts"]["flagged_share"], test_report["verdicts"]["uncertain"], test_report["verdicts"]["out_of_distribution"])
    return result
