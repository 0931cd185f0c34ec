"""c06 evaluation stage: judge every trained model on validation, choose one, report on test.

The choice uses validation only (macro F1, ties by lower validation log loss); the test
split is touched once, for the chosen model. Every figure states n, the error count and a
95 % Wilson interval. A temperature fitted on validation is stored with the model when it
lowers the validation negative log-likelihood. The chosen model, its input contract,
temperature and model card are written as a self-contained bundle (`served/`); the select
stage (c07) decides whether it or a tuned model is served.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from metal_defect import baselines, metrics, plots
from metal_defect.artifacts import read_json, write_json_atomic
from metal_defect.components.c01_data_ingestion import REPORT_FILE as INGESTION_REPORT
from metal_defect.components.c02_data_preprocessing import RECORDS_FILE
from metal_defect.components.c02_data_preprocessing import REPORT_FILE as PREPROCESSING_REPORT
from metal_defect.components.c06_training import HISTORY_FILE, MODELS_DIR, TRAIN_SUMMARY, TRAINED_MODEL
from metal_defect.config import DataPreprocessingParams, EvaluationParams, SchemaConfig
from metal_defect.serving import explain, ood
from metal_defect.serving.bundle import (
    BUNDLE_DIR,
    MODEL_CARD,
    MODEL_FILE,
    OodSpec,
    ServingSpec,
    load_model,
    write_manifest,
    write_ood_references,
    write_spec,
)
from metal_defect.serving.bundle import METRICS_FILE as BUNDLE_METRICS
from metal_defect.serving.predictor import OUT_OF_DISTRIBUTION, UNCERTAIN, Predictor

log = logging.getLogger(__name__)


def metrics_files(kind: str) -> tuple[str, str]:
    """(all models' metrics, the chosen model's record) file names for base or tuned models."""
    return f"{kind}_models_metrics.json", f"best_{kind}_model.json"


BEST_FILE = metrics_files("base")[1]
GATE_FILE = "quality_gate.json"
OOD_MAX_REFERENCE = 20000  # training images kept as the OOD reference (a random subset above this)
BASELINE_MAX_TRAIN = 5000  # the classical baseline fits on at most this many training images (seconds, not minutes)


def run_stage(io: Any, *, evaluation: EvaluationParams, data_preprocessing: DataPreprocessingParams, schema: SchemaConfig) -> dict[str, Any]:
    """Runner entry: evaluate the models of the train stage on c02's valid/test splits."""
    return evaluate_models(io.inputs["data_ingestion"], io.inputs["data_preprocessing"], io.inputs["train"], evaluation, io.out_dir,
                           run_id=io.run_id, limits=data_preprocessing, extensions=tuple(schema.extensions))


def load_split(prepared: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 images, labels and file names of one prepared split (read exactly, no augmentation)."""
    records = [r for r in read_json(prepared / RECORDS_FILE)["records"] if r["split"] == split]
    images = [np.asarray(Image.open(prepared / r["file"])) for r in records]
    images = [im[..., None] if im.ndim == 2 else im for im in images]
    return np.stack(images) if images else np.zeros((0, 1, 1, 1), np.uint8), np.array([r["label_index"] for r in records]), [r["source"] for r in records]


def evaluate_models(ingested: Path, prepared: Path, trained: Path, params: EvaluationParams, out_dir: Path, run_id: str | None = None,
                    limits: DataPreprocessingParams | None = None, extensions: tuple[str, ...] = (), kind: str = "base") -> dict[str, Any]:
    """Score every trained model on validation through the predictor, choose one, fit its verdict
    thresholds, write the bundle, and report the chosen model once on test.

    `trained` is a folder laid out like the train stage's output (c07 writes its tuned model the
    same way, with kind="tuned": tuned_models_metrics.json, best_tuned_model.json).
    """
    metrics_file, best_file = metrics_files(kind)
    train_summary = read_json(trained / TRAIN_SUMMARY)
    class_names = train_summary["class_names"]
    records = read_json(prepared / RECORDS_FILE)
    x_valid, y_valid, valid_names = load_split(prepared, "valid")
    results: dict[str, Any] = {}
    valid_probs: dict[str, np.ndarray] = {}
    for name, info in train_summary["models"].items():
        model_dir = trained / MODELS_DIR / name
        spec = ServingSpec(model_name=name, class_names=tuple(class_names), image_size=records["image_size"], color_mode=records["color_mode"],
                           resize=records.get("resize", "stretch"), pretrained=info["pretrained"], run_id=run_id,
                           max_image_pixels=limits.max_image_pixels if limits else 40_000_000, max_file_mb=limits.max_file_mb if limits else 50.0,
                           extensions=extensions or ServingSpec.extensions)
        candidate = Predictor(load_model(model_dir / TRAINED_MODEL), spec)
        probs = candidate.raw_probabilities(x_valid, params.batch_size)
        valid_probs[name] = probs
        folder = out_dir / "models" / name
        results[name] = {"valid": report_split(y_valid, probs, class_names, x_valid, valid_names, folder, f"{name}, validation", params),
                         "pretrained": info["pretrained"], "schedule": info["schedule"], "epochs_run": info["epochs_run"], "spec": spec}
        history = read_json(model_dir / HISTORY_FILE) if (model_dir / HISTORY_FILE).is_file() else []
        if history:
            plots.training_curves(history, f"{name}: training curves ({info['epochs_run']} epochs, {info['schedule']})",
                                  metrics.caption(results[name]["valid"]["n"], results[name]["valid"]["errors"]), folder / "training_curves.png")
    best = choose_best(results, params.select_metric)
    log.info("best %s model on validation: %s (%s %.4f)", kind, best, params.select_metric, results[best]["valid"][params.select_metric])
    spec = results[best].pop("spec")
    for other in results.values():
        other.pop("spec", None)

    temperature, calibration = calibrate(y_valid, valid_probs[best], params)
    chosen = Predictor(load_model(trained / MODELS_DIR / best / TRAINED_MODEL), dataclasses.replace(spec, temperature=temperature))
    x_train, y_train, _ = load_split(prepared, "train")
    spec, scorer, verdicts = fit_verdicts(chosen, x_train, x_valid, y_valid, params)

    bundle = out_dir / BUNDLE_DIR
    bundle.mkdir(parents=True)
    shutil.copy2(trained / MODELS_DIR / best / TRAINED_MODEL, bundle / MODEL_FILE)
    write_ood_references(bundle, scorer)
    valid_records = [r for r in records["records"] if r["split"] == "valid"]
    layer, heatmap_choice = choose_heatmap_layer(chosen, x_valid, valid_probs[best].argmax(axis=1), valid_records, params.annotations)
    verdicts["heatmap"] = heatmap_choice
    spec = dataclasses.replace(spec, created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), heatmap_layer=layer)
    write_spec(bundle, spec)
    write_manifest(bundle)

    test_report = None
    x_test, y_test, test_names = load_split(prepared, "test")
    served = Predictor.from_bundle(bundle)
    if len(y_test):
        raw_test, features = served.forward(x_test, params.batch_size)
        answers = served.answers_from(served.calibrate(raw_test), features, x_test, test_names)
        test_report = report_split(y_test, served.calibrate(raw_test), class_names, x_test, test_names, out_dir / "test",
                                   f"{best}, test split (chosen on validation)", params)
        test_report["calibration_uncalibrated"] = calibration_summary(y_test, raw_test, params)
        test_report["verdicts"] = verdict_counts(answers, y_test, class_names)
        verdicts["test"] = test_report["verdicts"]
        test_records = [r for r in records["records"] if r["split"] == "test"]
        pointing = pointing_report(served, x_test, test_records, raw_test.argmax(axis=1), class_names, params.annotations, out_dir / "test")
        if pointing:
            test_report["pointing"] = pointing
        gate = quality_gate(served, x_train, y_train, class_names, "test", y_test, raw_test.argmax(axis=1), x_test,
                            trained / MODELS_DIR / best, params)
    else:
        gate = quality_gate(served, x_train, y_train, class_names, "valid", y_valid, valid_probs[best].argmax(axis=1), x_valid,
                            trained / MODELS_DIR / best, params)
    write_json_atomic(out_dir / GATE_FILE, gate)
    results[best]["calibration"] = calibration
    results[best]["verdicts"] = verdicts
    write_json_atomic(out_dir / metrics_file, {"selected_by": f"validation {params.select_metric}, ties by validation log loss",
                                               "models": results})
    best_record = {"name": best, "model": f"{BUNDLE_DIR}/{MODEL_FILE}", "bundle": BUNDLE_DIR, "temperature": temperature,
                   "pretrained": results[best]["pretrained"], "valid": _headline(results[best]["valid"]),
                   "test": _headline(test_report) if test_report else None, "calibration": calibration,
                   "weak_model": gate["weak_model"], "weak_reasons": gate["reasons"], "verdicts": verdicts,
                   "pointing": test_report.get("pointing") if test_report else None}
    write_json_atomic(out_dir / best_file, best_record)
    card = model_card(best, results[best], test_report, calibration, spec, ingested, prepared, train_summary["models"][best], gate, verdicts)
    (out_dir / MODEL_CARD).write_text(card, encoding="utf-8")
    # the bundle is complete only with its card, metrics and the weak-model flag: rewrite spec and manifest last
    (bundle / MODEL_CARD).write_text(card, encoding="utf-8")
    write_json_atomic(bundle / BUNDLE_METRICS, {k: best_record[k] for k in ("name", "valid", "test", "calibration", "verdicts", "pointing")} | {"quality_gate": gate})
    write_spec(bundle, dataclasses.replace(spec, weak_model=gate["weak_model"], weak_reasons=tuple(gate["reasons"])))
    write_manifest(bundle)
    headline = {"best_model": best, "valid_accuracy": results[best]["valid"]["accuracy"], "valid_macro_f1": results[best]["valid"]["macro_f1"],
                "weak_model": gate["weak_model"], "classical_macro_f1": gate["classical"]["macro_f1"], "majority_macro_f1": gate["majority"]["macro_f1"],
                "uncertain_threshold": spec.uncertain_threshold}
    if test_report:
        headline |= {"test_accuracy": test_report["accuracy"], "test_macro_f1": test_report["macro_f1"], "test_errors": test_report["errors"],
                     "test_n": test_report["n"], "test_ece": test_report["calibration"]["ece"],
                     "test_flagged_share": test_report["verdicts"]["flagged_share"]}
        if test_report.get("pointing"):
            headline |= {"pointing_strict": test_report["pointing"]["overall"]["strict"],
                         "pointing_tolerant": test_report["pointing"]["overall"]["tolerant"]}
        log.info("test split (%s): %s, macro F1 %.4f; flagged %.1f %% (uncertain %d, out of distribution %d)", best,
                 metrics.caption(test_report["n"], test_report["errors"]), test_report["macro_f1"],
                 100 * test_report["verdicts"]["flagged_share"], test_report["verdicts"]["uncertain"], test_report["verdicts"]["out_of_distribution"])
    return {"metrics": headline, "temperature": temperature}


def fit_verdicts(predictor: Predictor, x_train: np.ndarray, x_valid: np.ndarray, y_valid: np.ndarray, params: EvaluationParams) -> tuple[ServingSpec, ood.OodScorer, dict[str, Any]]:
    """The uncertainty threshold, and the OOD references and thresholds, fitted on train/validation.

    OOD thresholds are quantiles over validation plus its benign copies (JPEG, resampled): an
    image saved another way or at another size is still in distribution.
    """
    spec = predictor.spec
    layer, texture = ood.feature_layer(predictor.model), ood.texture_layer(predictor.model)
    keep = np.arange(len(x_train))
    if len(keep) > OOD_MAX_REFERENCE:
        keep = np.sort(np.random.default_rng(0).choice(len(keep), OOD_MAX_REFERENCE, replace=False))
    k = ood.neighbours_for(len(keep)) if params.ood_neighbours == "auto" else int(params.ood_neighbours)
    probe = Predictor(predictor.model, dataclasses.replace(spec, ood=OodSpec(layer, k, 1.0, 1.0, (), (), "", 0, False, texture_layer=texture)))
    penultimate_size = int(np.prod(predictor.model.get_layer(layer).output.shape[1:]))
    reference = x_train[keep]
    scorer = ood.fit_scorer(probe.forward(reference, params.batch_size)[1], reference, k, penultimate_size,
                            probe.forward(255 - reference, params.batch_size)[1])
    # validation first, then its benign copies: one pass gives both the validation answers and the fitting distances
    fitting = np.concatenate([x_valid, ood.benign_variants(x_valid)]) if len(x_valid) else x_valid
    raw_fitting, fitting_features = probe.forward(fitting, params.batch_size)
    raw_valid = raw_fitting[:len(x_valid)]
    distances = scorer.components(fitting_features, fitting)
    q = params.ood_valid_quantile
    if len(fitting):
        scorer.set_thresholds(distances, q)
    nearest = "nearest" if k == 1 else f"{k}-th nearest"
    rule = (f"distance to the {nearest} of {len(keep)} training images, in L2-normalised '{layer}' features, in "
            f"{scorer.statistics.shape[1]} standardised image statistics, or in the channel means and spreads of '{texture}', or that "
            f"last distance over the distance to the training images' negatives (polarity), is above the {q:g} quantile of the same "
            f"over {len(x_valid)} validation images and their {len(ood.BENIGN_CHANGES)} benign copies each (JPEG, resampled, saved larger)")
    calibrated = probe.calibrate(raw_valid)
    threshold, uncertain = uncertainty_threshold(calibrated.max(axis=1) if len(calibrated) else np.zeros(0),
                                                 calibrated.argmax(axis=1) == y_valid if len(calibrated) else np.zeros(0, bool),
                                                 params.uncertain_review_cost, params.uncertain_max_share)
    ood_spec = OodSpec(layer, k, scorer.feature_threshold, scorer.statistics_threshold, tuple(map(float, scorer.stats_mean)),
                       tuple(map(float, scorer.stats_scale)), rule, len(keep), spec.color_mode == "grayscale", texture_layer=texture,
                       texture_threshold=scorer.texture_threshold, polarity_threshold=scorer.polarity_threshold,
                       texture_mean=tuple(map(float, scorer.texture_mean)), texture_scale=tuple(map(float, scorer.texture_scale)))
    spec = dataclasses.replace(spec, uncertain_threshold=threshold, uncertain_rule=uncertain["rule"], ood=ood_spec)
    valid_scores = scorer.combine(distances[:len(x_valid)])
    log.info("verdicts: uncertain below confidence %.3f (%s); out of distribution: %s", threshold, uncertain["rule"], rule)
    return spec, scorer, {"uncertain": uncertain, "ood": {"rule": rule, **dict(zip((f"{c}_threshold" for c in ood.COMPONENTS), scorer.thresholds)),
                                                          "valid_flagged": int(np.sum(valid_scores > 1.0))}}


def uncertainty_threshold(confidence: np.ndarray, correct: np.ndarray, review_cost: float, max_share: float) -> tuple[float, dict[str, Any]]:
    """The confidence threshold that minimises, on validation, wrong answers given plus `review_cost`
    times the images flagged (the least confident first), flagging at most `max_share` of them.

    With review_cost 0.5 a band of low confidences is flagged when the model was wrong there more
    often than right; a model that errs only at high confidence gets threshold 0 (nothing flagged).
    Ties keep the lower threshold.
    """
    rule = (f"confidence threshold minimising wrong answers + {review_cost:g} x flagged images on validation, "
            f"flagging at most {max_share:g} of it")
    n = len(confidence)
    if n == 0:
        return 0.0, {"rule": rule, "valid_n": 0, "valid_flagged": 0}
    order = np.argsort(confidence, kind="stable")
    conf, wrong = confidence[order], ~correct[order]
    wrong_from = np.r_[np.cumsum(wrong[::-1])[::-1], 0]  # wrong answers among positions i.. (i = 0..n)
    allowed = min(int(np.floor(max_share * n)), n - 1)
    cost = [wrong_from[i] + review_cost * i for i in range(allowed + 1)]
    cut = int(np.argmin(cost))
    threshold = 0.0 if cut == 0 else float(conf[cut])
    answered = confidence >= threshold
    return threshold, {"rule": rule, "valid_n": n, "valid_flagged": int(n - answered.sum()),
                       "valid_error_answered": float(np.mean(~correct[answered])) if answered.any() else None,
                       "valid_error_all": float(np.mean(~correct))}


def boxes_for(records: list[dict[str, Any]], annotations: str | None) -> tuple[list[int], list[explain.Boxes]]:
    """Indices of the records with Pascal VOC boxes in `annotations` (matched by file name), and their
    boxes scaled to each image's original size."""
    if not annotations or not Path(annotations).is_dir():
        return [], []
    chosen, boxes = [], []
    for i, record in enumerate(records):
        xml = Path(annotations) / f"{Path(record['source']).stem}.xml"
        if xml.is_file():
            try:
                found = explain.read_voc(xml)
            except ValueError as exc:
                log.warning("heatmap boxes: %s", exc)
                continue
            chosen.append(i)
            boxes.append(found.scaled_to(*(record.get("original_size") or (found.width, found.height))))
    return chosen, boxes


def _pointing(predictor: Predictor, images: np.ndarray, records: list[dict[str, Any]], chosen: list[int], boxes: list[explain.Boxes],
              classes: np.ndarray) -> tuple[dict[str, Any], list[np.ndarray]]:
    sizes = [tuple(records[i].get("original_size") or (b.width, b.height)) for i, b in zip(chosen, boxes)]
    heat = predictor.heatmaps(images[chosen], classes[chosen], sizes)
    return explain.pointing_accuracy([explain.peak(h) for h in heat], boxes, [records[i]["label"] for i in chosen]), heat


def choose_heatmap_layer(predictor: Predictor, x_valid: np.ndarray, predicted: np.ndarray, valid_records: list[dict[str, Any]],
                         annotations: str | None) -> tuple[str, dict[str, Any]]:
    """The heatmap layer: among the deepest layer of each feature-map size, the one whose LayerCAM
    points into the validation boxes most often; without boxes, explain.heatmap_layer's default."""
    size = int(predictor.spec.image_size)
    default = explain.heatmap_layer(predictor.model, size)
    chosen, boxes = boxes_for(valid_records, annotations)
    if not chosen:
        return default, {"layer": default, "method": "layercam", "chosen_by": "default rule (no validation boxes): the deepest layer at stride 4"}
    scores: dict[str, float] = {}
    for layer, _side in explain.candidate_layers(predictor.model, size):
        probe = Predictor(predictor.model, dataclasses.replace(predictor.spec, heatmap_layer=layer, heatmap_method="layercam"))
        scores[layer] = _pointing(probe, x_valid, valid_records, chosen, boxes, predicted)[0]["overall"]["strict"]
    best = max(scores, key=lambda name: (round(scores[name], 6), -list(scores).index(name)))  # ties: the deeper layer
    log.info("heatmap layer %s: LayerCAM validation pointing accuracy %s", best, ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    return best, {"layer": best, "method": "layercam", "chosen_by": f"validation pointing accuracy on {len(chosen)} boxed images",
                  "validation_strict": scores}


def pointing_report(predictor: Predictor, images: np.ndarray, records: list[dict[str, Any]], predicted: np.ndarray, class_names: list[str],
                    annotations: str | None, out_dir: Path) -> dict[str, Any] | None:
    """Pointing accuracy of the served heatmaps on the test images that have Pascal VOC boxes, beside
    plain Grad-CAM at the last spatial layer, and a grid of overlays (hits and misses of every class);
    None when no test image has boxes."""
    import time

    started = time.perf_counter()
    chosen, boxes = boxes_for(records, annotations)
    if not chosen:
        if annotations:
            log.info("no test image has boxes in %s: no pointing accuracy", annotations)
        return None
    result, heat = _pointing(predictor, images, records, chosen, boxes, predicted)
    baseline_layer = explain.last_spatial_layer(predictor.model)
    baseline = Predictor(predictor.model, dataclasses.replace(predictor.spec, heatmap_layer=baseline_layer, heatmap_method="gradcam"))
    baseline_result = _pointing(baseline, images, records, chosen, boxes, predicted)[0]
    hits = result.pop("hits")
    baseline_result.pop("hits")
    result |= {"layer": predictor.gradcam().layer, "method": predictor.gradcam().method, "annotations": str(annotations),
               "images_with_boxes": len(chosen), "of_test_images": len(records),
               "gradcam_last_layer": {"layer": baseline_layer, "overall": baseline_result["overall"]},
               "seconds": round(time.perf_counter() - started, 2)}
    overall = result["overall"]
    log.info("heatmap pointing accuracy on %d boxed test images (%s at %s): %.3f strict, %.3f within %d px (chance %.3f); "
             "plain Grad-CAM at %s: %.3f strict", len(chosen), result["method"], result["layer"], overall["strict"], overall["tolerant"],
             result["tolerance_px"], overall["chance"], baseline_layer, baseline_result["overall"]["strict"])
    shown = []
    for label in dict.fromkeys(records[i]["label"] for i in chosen):  # up to 2 hits and 2 misses per class
        of_class = [j for j, i in enumerate(chosen) if records[i]["label"] == label]
        shown += [j for j in of_class if hits[j]][:2] + [j for j in of_class if not hits[j]][:2]
    pictures, captions = [], []
    for j in shown:
        record = records[chosen[j]]
        source = Path(record["source"])
        original = Image.open(source) if source.is_file() else Image.fromarray(images[chosen[j]].squeeze())
        size = tuple(record.get("original_size") or original.size)
        pictures.append(explain.draw_boxes(explain.overlay(original.resize(size), heat[j]), boxes[j]))
        captions.append(f"{'HIT' if hits[j] else 'MISS'}: {source.name}\npredicted {class_names[predicted[chosen[j]]]}")
    explain.overlay_grid(pictures, captions, f"{explain.METHOD_NAMES[result['method']]} at {result['layer']} on boxed test images: peak inside a box "
                         f"{overall['strict']:.1%} (chance {overall['chance']:.1%}); ring = peak, white boxes = ground truth",
                         out_dir / "heatmaps.png", columns=8)
    write_json_atomic(out_dir / "pointing.json", result)
    return result


def verdict_counts(answers: list[Any], y_true: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """How many answers were flagged, and how accurate the unflagged ones were."""
    n = len(answers)
    uncertain = sum(a.verdict == UNCERTAIN for a in answers)
    outside = sum(a.verdict == OUT_OF_DISTRIBUTION for a in answers)
    kept = [i for i, a in enumerate(answers) if not a.flagged]
    wrong_flagged = sum(1 for i, a in enumerate(answers) if a.flagged and a.label != class_names[y_true[i]])
    return {"n": n, "uncertain": uncertain, "out_of_distribution": outside, "flagged_share": (uncertain + outside) / n if n else 0.0,
            "accuracy_unflagged": float(np.mean([answers[i].label == class_names[y_true[i]] for i in kept])) if kept else None,
            "errors_flagged": wrong_flagged, "errors_total": sum(a.label != class_names[y_true[i]] for i, a in enumerate(answers))}


def quality_gate(predictor: Predictor, x_train: np.ndarray, y_train: np.ndarray, class_names: list[str], split: str, y_eval: np.ndarray,
                 model_pred: np.ndarray, x_eval: np.ndarray, model_dir: Path, params: EvaluationParams) -> dict[str, Any]:
    """Is the chosen model clearly better than what a much simpler method gets on the same split?

    Flags `weak_model` with a reason when the model underfits (training accuracy at the last
    epoch below `gate_min_train_accuracy`), is near the majority-class baseline (macro F1
    less than `gate_majority_margin` above it), or is not clearly better than the classical
    texture baseline (overlapping 95 % bootstrap macro-F1 intervals, or below it) while its
    own interval does not start above `gate_good_macro_f1`.
    """
    import time

    started = time.perf_counter()
    if len(y_train) > BASELINE_MAX_TRAIN:
        keep = np.sort(np.random.default_rng(0).choice(len(y_train), BASELINE_MAX_TRAIN, replace=False))
        x_train, y_train = x_train[keep], y_train[keep]
    k = len(class_names)

    def score(pred: np.ndarray) -> dict[str, Any]:
        lo, hi = metrics.bootstrap_macro_f1(y_eval, pred, k, params.bootstrap_samples)
        return {"macro_f1": metrics.macro_f1(y_eval, pred, k), "macro_f1_ci95": [lo, hi], "accuracy": float(np.mean(pred == y_eval))}

    model = score(model_pred)
    classical = score(baselines.classical_predictions(x_train, y_train, x_eval))
    majority_pred = baselines.majority_predictions(y_train, len(y_eval))
    majority = score(majority_pred) | {"class": class_names[int(majority_pred[0])] if len(majority_pred) else None}
    # Can the model fit its own training images? Measured on them as they are (no augmentation,
    # dropout off): the last epoch's running accuracy is lowered by both and is no fair test.
    train_pred = predictor.raw_probabilities(x_train, params.batch_size).argmax(axis=1)
    train_accuracy = float(np.mean(train_pred == y_train)) if len(y_train) else None
    history = read_json(model_dir / HISTORY_FILE) if (model_dir / HISTORY_FILE).is_file() else []
    last_epoch = next((row["accuracy"] for row in reversed(history) if "accuracy" in row), None)
    reasons = []
    if train_accuracy is not None and train_accuracy < params.gate_min_train_accuracy:
        reasons.append(f"underfits: accuracy {train_accuracy:.3f} on its own training images (below {params.gate_min_train_accuracy:g})")
    if model["macro_f1"] < majority["macro_f1"] + params.gate_majority_margin:
        reasons.append(f"near the majority-class baseline: macro F1 {model['macro_f1']:.3f} against {majority['macro_f1']:.3f} "
                       f"for always answering '{majority['class']}'")
    (m_lo, m_hi), (c_lo, c_hi) = model["macro_f1_ci95"], classical["macro_f1_ci95"]
    not_better = model["macro_f1"] <= classical["macro_f1"] or (m_lo <= c_hi and c_lo <= m_hi)
    note = ""
    if not_better and m_lo >= params.gate_good_macro_f1:
        note = (f"the classical baseline is about as good here (macro F1 {classical['macro_f1']:.3f}): the data is easy for texture "
                f"features, and the model's interval starts above {params.gate_good_macro_f1:g}, so it is not flagged")
    if not_better and m_lo < params.gate_good_macro_f1:
        reasons.append(f"not clearly better than a classical texture baseline (LBP + gradients, RBF SVM): macro F1 {model['macro_f1']:.3f} "
                       f"(95% CI {m_lo:.3f}–{m_hi:.3f}) against {classical['macro_f1']:.3f} ({c_lo:.3f}–{c_hi:.3f})")
    gate = {"weak_model": bool(reasons), "reasons": reasons, "note": note, "split": split, "n": len(y_eval), "model": model, "classical": classical,
            "majority": majority, "train_accuracy": train_accuracy, "train_accuracy_last_epoch": last_epoch,
            "seconds": round(time.perf_counter() - started, 2)}
    if reasons:
        log.warning("!" * 78)
        log.warning("WEAK MODEL: %s is flagged weak_model on the %s split:", predictor.spec.model_name, split)
        for reason in reasons:
            log.warning("  - %s", reason)
        log.warning("Check the data (labels, class balance, image size) before trusting its answers; see the model card.")
        log.warning("!" * 78)
    else:
        log.info("quality gate passed on %s: macro F1 %.4f against classical %.4f and majority %.4f (%.1f s)", split, model["macro_f1"],
                 classical["macro_f1"], majority["macro_f1"], gate["seconds"])
    return gate


def report_split(y_true: np.ndarray, probs: np.ndarray, class_names: list[str], images: np.ndarray, names: list[str], folder: Path,
                 title: str, params: EvaluationParams) -> dict[str, Any]:
    """Metrics JSON, confusion matrices, reliability diagram and misclassified gallery for one set."""
    folder.mkdir(parents=True, exist_ok=True)
    result = metrics.classification_metrics(y_true, probs, class_names)
    result["calibration"] = calibration_summary(y_true, probs, params)
    caption = metrics.caption(result["n"], result["errors"])
    plots.confusion_matrices(np.array(result["confusion_matrix"]), class_names, caption, f"{title}: confusion matrix", folder / "confusion_matrix.png")
    cal = result["calibration"]
    plots.reliability_diagram(cal["bins"], cal["ece"], tuple(cal["ece_ci95"]), caption, f"{title}: reliability", folder / "reliability_diagram.png")
    wrong = np.flatnonzero(probs.argmax(axis=1) != y_true)[: params.misclassified_max]
    captions = [f"{Path(names[i]).name}\ntrue {class_names[y_true[i]]}\npred {class_names[probs[i].argmax()]} ({probs[i].max():.0%})" for i in wrong]
    plots.misclassified_gallery([images[i] for i in wrong], captions, f"{title}: misclassified ({caption})", folder / "misclassified.png")
    result["misclassified"] = [{"file": names[i], "true": class_names[y_true[i]], "predicted": class_names[probs[i].argmax()],
                                "confidence": float(probs[i].max())} for i in np.flatnonzero(probs.argmax(axis=1) != y_true)]
    write_json_atomic(folder / "metrics.json", result)
    return result


def calibration_summary(y_true: np.ndarray, probs: np.ndarray, params: EvaluationParams) -> dict[str, Any]:
    ece, table = metrics.expected_calibration_error(y_true, probs, params.calibration_bins)
    lo, hi = metrics.bootstrap_ece(y_true, probs, params.calibration_bins, params.bootstrap_samples)
    return {"ece": ece, "ece_ci95": [lo, hi], "n": len(y_true), "bins": table, "nll": metrics.negative_log_likelihood(y_true, probs)}


def calibrate(y_valid: np.ndarray, probs: np.ndarray, params: EvaluationParams) -> tuple[float, dict[str, Any]]:
    """Fit a bounded temperature on validation; keep it only if it lowers the validation NLL."""
    fitted = metrics.fit_temperature(y_valid, probs, params.temperature_min, params.temperature_max)
    before = metrics.negative_log_likelihood(y_valid, probs)
    after = metrics.negative_log_likelihood(y_valid, metrics.apply_temperature(probs, fitted))
    helps = after < before - 1e-4
    info = {"fitted_temperature": fitted, "used": helps, "valid_nll_before": before, "valid_nll_after": after,
            "valid_ece_before": metrics.expected_calibration_error(y_valid, probs, params.calibration_bins)[0],
            "valid_ece_after": metrics.expected_calibration_error(y_valid, metrics.apply_temperature(probs, fitted), params.calibration_bins)[0]}
    log.info("temperature scaling: T=%.3f, validation NLL %.4f -> %.4f (%s)", fitted, before, after, "stored" if helps else "not stored: no gain")
    return (fitted if helps else 1.0), info


def choose_best(results: dict[str, Any], metric: str) -> str:
    """Highest validation `metric`; ties broken by lower validation log loss. Never looks at test."""
    return min(results, key=lambda n: (-round(results[n]["valid"][metric], 6), results[n]["valid"]["log_loss"]))


def _headline(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if report is None:
        return None
    keys = ("n", "errors", "accuracy", "accuracy_ci95", "macro_precision", "macro_recall", "macro_f1", "log_loss")
    return {k: report[k] for k in keys} | {"ece": report["calibration"]["ece"], "ece_ci95": report["calibration"]["ece_ci95"]}


def model_card(name: str, result: dict[str, Any], test: dict[str, Any] | None, calibration: dict[str, Any], spec: ServingSpec,
               ingested: Path, prepared: Path, train_info: dict[str, Any], gate: dict[str, Any], verdicts: dict[str, Any]) -> str:
    """A Markdown model card: data, split, model, metrics with intervals, calibration, known limits."""
    ingestion = read_json(ingested / INGESTION_REPORT)
    pre = read_json(prepared / PREPROCESSING_REPORT)
    valid = result["valid"]

    def line(label: str, r: dict[str, Any]) -> str:
        lo, hi = r["accuracy_ci95"]
        return (f"| {label} | {r['n']} | {r['errors']} | {r['accuracy']:.2%} ({lo:.1%}–{hi:.1%}) | {r['macro_f1']:.4f} | "
                f"{r['calibration']['ece']:.4f} ({r['calibration']['ece_ci95'][0]:.4f}–{r['calibration']['ece_ci95'][1]:.4f}) |")

    per_class = test["per_class"] if test else valid["per_class"]
    rows = "\n".join(f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |" for c, v in per_class.items())
    counts = "; ".join(f"{s}: {sum(v.values())}" for s, v in pre["counts"].items())

    def yardstick(label: str, r: dict[str, Any]) -> str:
        return f"| {label} | {r['accuracy']:.2%} | {r['macro_f1']:.4f} ({r['macro_f1_ci95'][0]:.4f}–{r['macro_f1_ci95'][1]:.4f}) |"

    verdict = ("**WEAK MODEL** — do not trust its answers before the data is checked:\n" + "\n".join(f"- {r}" for r in gate["reasons"])
               if gate["weak_model"] else f"Passed{': ' + gate['note'] if gate.get('note') else ': clearly better than both yardsticks below'}.")
    train_acc = gate["train_accuracy"]
    return f"""# Model card: {name}

Created {spec.created}.

## Quality gate
{verdict}

On the {gate['split']} split (n={gate['n']}); accuracy on its own training images {f"{train_acc:.3f}" if train_acc is not None else "n/a"}.

| | accuracy | macro F1 (95% bootstrap CI) |
|---|---|---|
{yardstick(name, gate['model'])}
{yardstick('classical baseline: LBP + gradient histograms, RBF SVM', gate['classical'])}
{yardstick(f"majority class ('{gate['majority']['class']}')", gate['majority'])}

## Data
- Source: `{ingestion['source']}` ({ingestion['source_kind']}, {ingestion['layout']} layout), {ingestion['images_found']} images found,
  {ingestion['skipped_count']} files skipped at ingestion, {len(pre['skipped'])} unusable at decoding,
  {sum(len(d['dropped']) for d in pre['duplicates'])} exact duplicates dropped.
- Classes (label order): {', '.join(spec.class_names)}.
- Split ({'kept from the source' if pre['presplit'] else 'stratified, seeded'}): {counts}.
- Input contract: {spec.image_size}×{spec.image_size} {spec.color_mode}, uint8 pixels, non-square images {'padded (aspect ratio kept)' if spec.resize == 'pad' else 'stretched'}; resizing and mode conversion by
  `to_model_input` (the same function for training and serving); normalisation inside the model.

## Model
- Architecture: `{name}`, {train_info['parameters']['total']:,} parameters{_macs(train_info['parameters'])}.
- Weights: {'pretrained (' + str(train_info['weights']) + ')' if train_info['pretrained'] else 'random initialisation (pretrained: false)'};
  schedule: {train_info['schedule']} ({', '.join(train_info['phases'])}), {train_info['epochs_run']} epochs,
  median {train_info['median_epoch_seconds']} s/epoch; strategy {train_info['strategy']} × {train_info['replicas']}.
- Chosen on validation macro F1 (ties: validation log loss) among the trained base models; test touched once.

## Metrics
| split | n | errors | accuracy (95% Wilson CI) | macro F1 | ECE (95% bootstrap CI) |
|---|---|---|---|---|---|
{line('validation (before temperature: it was fitted here)', valid)}
{line('test', test) if test else '| test | - | - | (no test split) | - | - |'}

Per class ({'test' if test else 'validation'}):

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{rows}

## Calibration
Temperature fitted on validation: T = {calibration['fitted_temperature']:.3f}
({'stored with the model' if calibration['used'] else 'not stored: it did not lower validation NLL'});
validation NLL {calibration['valid_nll_before']:.4f} → {calibration['valid_nll_after']:.4f},
validation ECE {calibration['valid_ece_before']:.4f} → {calibration['valid_ece_after']:.4f}.
Test ECE above is with the stored temperature{'' if not test else f"; without it {test['calibration_uncalibrated']['ece']:.4f}"}.

{_pointing_text(test.get("pointing") if test else None)}## Verdicts: "uncertain" and "out of distribution"
{_verdict_text(spec, verdicts)}

## Known limits
- Trained only on the images above: {len(spec.class_names)} classes; an image of anything else (another defect type, another
  material, another camera or lighting) still gets one of these labels, often with high confidence.
- The test split is small: the interval above, not the point estimate, is what the data supports.
- Calibration was fitted and checked on small splits; confidences near 1.0 are the least certain part of it.
- The out-of-distribution check is fitted to these training images and catches many unlike images, not all: on NEU it
  flagged about a third of grey X-SDD steel images (other defects on other steel) and nearly all blank, noise, photograph
  and inverted images (README, `bench ood`).
- Images are reduced to {spec.image_size}×{spec.image_size} {spec.color_mode}: defects smaller than a few pixels at that scale may be missed.
"""


def _pointing_text(pointing: dict[str, Any] | None) -> str:
    if not pointing:
        return ""
    rows = "\n".join(f"| {c} | {v['n']} | {v['strict']:.3f} | {v['tolerant']:.3f} | {v['chance']:.3f} |" for c, v in pointing["per_class"].items())
    o = pointing["overall"]
    base = pointing["gradcam_last_layer"]
    return f"""## Where it looks: heatmap pointing accuracy
On {pointing['images_with_boxes']} of {pointing['of_test_images']} test images with ground-truth boxes (`{pointing['annotations']}`),
{explain.METHOD_NAMES[pointing['method']]} of the predicted class at layer `{pointing['layer']}`: a hit when the heatmap's peak lies inside a box (strict), or within
{pointing['tolerance_px']} px of one (the pointing game's tolerance). Chance = the mean share of the image inside boxes.
Plain Grad-CAM at the last spatial layer (`{base['layer']}`) scores {base['overall']['strict']:.3f} strict, {base['overall']['tolerant']:.3f} within {pointing['tolerance_px']} px.

| class | n | strict | within {pointing['tolerance_px']} px | chance |
|---|---|---|---|---|
{rows}
| **all** | {o['n']} | **{o['strict']:.3f}** | {o['tolerant']:.3f} | {o['chance']:.3f} |

"""


def _verdict_text(spec: ServingSpec, verdicts: dict[str, Any]) -> str:
    unc = verdicts["uncertain"]
    lines = [f"- `uncertain` when the calibrated confidence is below {spec.uncertain_threshold:.3f}: the {unc['rule']}; "
             f"{unc.get('valid_flagged', 0)} of {unc.get('valid_n', 0)} validation images flagged.",
             f"- `out_of_distribution` when the {verdicts['ood']['rule']} (the OOD score is the largest distance over its threshold: "
             f"above 1 is out of distribution); "
             f"{verdicts['ood']['valid_flagged']} validation images flagged. Also when the image has no usable content "
             f"(blank, or a few pixels){' or is in colour (this model was trained on grayscale images)' if spec.ood and spec.ood.colour_is_ood else ''}."]
    test = verdicts.get("test")
    if test:
        lines.append(f"- Test split: {test['uncertain']} uncertain and {test['out_of_distribution']} out of distribution of {test['n']} "
                     f"({test['flagged_share']:.1%} flagged); {test['errors_flagged']} of the {test['errors_total']} wrong answers were among the flagged.")
    lines.append("- Both thresholds are stored in `serving.json`; `predict --threshold T` (and the app's slider) overrides the uncertainty one per call.")
    return "\n".join(lines)


def _macs(counts: dict[str, Any]) -> str:
    return f", {counts['multiply_adds'] / 1e6:.0f} M multiply-adds per image" if counts.get("multiply_adds") else ""


def evaluate_folder(folder: Path, predictor: Predictor, config: Any, out_dir: Path) -> dict[str, Any]:
    """`main.py evaluate DIR`: the served (or a named) model on any labelled folder c01 recognises.

    Classes map onto the model's classes through the schema aliases; every split of a
    pre-split tree counts. Writes the same metrics and plots as the evaluation stage.
    """
    from metal_defect.components import c01_data_ingestion as c01

    class_names = predictor.class_names
    schema = dataclasses.replace(config.schema, classes=class_names, min_images_per_class=1,
                                 aliases={k: v for k, v in config.schema.aliases.items() if k in class_names})
    source = dataclasses.replace(config.data_ingestion, source=str(folder), sha256=None)
    out_dir.mkdir(parents=True, exist_ok=True)
    items, skipped, meta = c01.ingest(source, schema, out_dir / "_ingest", config.paths.download_cache, require_all_classes=False)
    paths = [i.path if Path(i.path).is_absolute() else str(out_dir / "_ingest" / i.path) for i in items]
    images, ok, problems, reasons = predictor.load_images(paths)
    labels = np.array([class_names.index(items[i].label) for i in ok])
    names = [paths[i] for i in ok]
    raw, features = predictor.forward(images, config.evaluation.batch_size)
    probs = predictor.calibrate(raw)
    answers = predictor.answers_from(probs, features, images, names, reasons)
    title = f"{predictor.spec.model_name} on {Path(folder).name}"
    report = report_split(labels, probs, class_names, images, names, out_dir, title, config.evaluation)
    report |= {"verdicts": verdict_counts(answers, labels, class_names), "folder": str(folder), "layout": meta["layout"], "bundle": str(predictor.bundle), "temperature": predictor.temperature,
               "skipped_at_ingestion": [dataclasses.asdict(s) for s in skipped], "unreadable": problems}
    write_json_atomic(out_dir / "metrics.json", report)
    shutil.rmtree(out_dir / "_ingest", ignore_errors=True)
    return report
