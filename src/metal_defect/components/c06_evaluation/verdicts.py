"""c06 verdicts: the uncertainty threshold and the out-of-distribution references and thresholds, fitted on train/validation."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from metal_defect.config import EvaluationParams
from metal_defect.serving import ood
from metal_defect.serving.bundle import OodSpec, ServingSpec
from metal_defect.serving.predictor import OUT_OF_DISTRIBUTION, UNCERTAIN, Predictor

log = logging.getLogger(__name__)


OOD_MAX_REFERENCE = 20000  # training images kept as the OOD reference (a random subset above this)


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
