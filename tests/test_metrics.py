"""Metric helpers: Wilson intervals, ECE, bootstrap, temperature scaling, model choice."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REPO

from metal_defect import metrics
from metal_defect.components.c06_evaluation.scores import calibrate, choose_best
from metal_defect.config import load_config


def test_wilson_interval_known_values():
    lo, hi = metrics.wilson_interval(117, 120)
    assert lo == pytest.approx(0.9291, abs=1e-3) and hi == pytest.approx(0.9915, abs=1e-3)
    assert metrics.wilson_interval(10, 10)[1] == pytest.approx(1.0) and metrics.wilson_interval(10, 10)[0] < 0.75
    assert metrics.caption(252, 2).startswith("n=252, 2 errors, accuracy 99.2% (95% Wilson CI")


def test_classification_metrics_on_a_known_case():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[[0, 0, 1, 2, 2, 2]] * 0.9 + 0.1 / 3
    result = metrics.classification_metrics(y, probs, ["a", "b", "c"])
    assert result["errors"] == 1 and result["accuracy"] == pytest.approx(5 / 6)
    assert result["confusion_matrix"] == [[2, 0, 0], [0, 1, 1], [0, 0, 2]]
    assert result["per_class"]["b"]["recall"] == 0.5 and result["per_class"]["c"]["precision"] == pytest.approx(2 / 3)


def test_ece_is_zero_when_confidence_matches_accuracy_and_large_when_overconfident():
    rng = np.random.default_rng(0)
    n = 20000
    confidence = rng.uniform(0.5, 1.0, n)
    correct = rng.random(n) < confidence
    y = np.zeros(n, dtype=int)
    probs = np.stack([np.where(correct, confidence, 1 - confidence), np.where(correct, 1 - confidence, confidence)], axis=1)
    assert metrics.expected_calibration_error(y, probs, 15)[0] < 0.01
    overconfident = np.stack([np.where(correct, 0.999, 0.001), np.where(correct, 0.001, 0.999)], axis=1)
    assert metrics.expected_calibration_error(y, overconfident, 15)[0] > 0.2
    lo, hi = metrics.bootstrap_ece(y[:500], probs[:500], 15, 200)
    assert 0 <= lo < hi < 0.2


def test_temperature_fit_recovers_a_known_temperature_within_bounds():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (4000, 4))
    true_probs = np.exp(logits / 2.0) / np.exp(logits / 2.0).sum(1, keepdims=True)
    y = np.array([rng.choice(4, p=p) for p in true_probs])
    sharp = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # the model is over-confident by T = 2
    assert metrics.fit_temperature(y, sharp, 0.05, 10.0) == pytest.approx(2.0, rel=0.1)
    assert metrics.fit_temperature(y, sharp, 0.05, 1.5) == pytest.approx(1.5, rel=1e-3)  # bounded
    assert np.allclose(metrics.apply_temperature(sharp, 1.0), sharp)


def test_model_choice_uses_validation_only_and_breaks_ties_by_loss():
    results = {
        "a": {"valid": {"macro_f1": 0.98, "accuracy": 0.98, "log_loss": 0.10}, "test": {"macro_f1": 1.0}},
        "b": {"valid": {"macro_f1": 0.99, "accuracy": 0.99, "log_loss": 0.30}, "test": {"macro_f1": 0.90}},
        "c": {"valid": {"macro_f1": 0.99, "accuracy": 0.99, "log_loss": 0.20}, "test": {"macro_f1": 0.80}},
    }
    assert choose_best(results, "macro_f1") == "c"


def test_a_validation_split_without_errors_sets_the_temperature_by_the_rule_of_succession():
    # NEU seed 44, 2026-12-07: every validation answer right, the fit ran to temperature_min (0.05) and the served
    # model showed three of its five test errors at 100 % confidence
    params = load_config(REPO).evaluation
    y = np.array([0, 1, 2, 0, 1, 2] * 4)
    right = np.array([[0.7, 0.2, 0.1], [0.2, 0.6, 0.2], [0.1, 0.3, 0.6]] * 8)
    assert metrics.fit_temperature(y, right, params.temperature_min, params.temperature_max) == pytest.approx(params.temperature_min, rel=0.01)
    temperature, info = calibrate(y, right, params)
    assert params.temperature_min < temperature < 1 and info["used"] and "every validation answer is right" in info["reason"]
    confidence = metrics.apply_temperature(right, temperature).max(axis=1).mean()
    assert confidence == pytest.approx((len(y) + 1) / (len(y) + 2), abs=1e-3)  # 25/26: sure, not certain
    one_wrong = right.copy()
    one_wrong[0] = [0.2, 0.7, 0.1]  # one error bounds the likelihood's fit: calibrated as before
    temperature, info = calibrate(y, one_wrong, params)
    assert "reason" not in info and temperature == info["fitted_temperature"] > params.temperature_min
    assert metrics.temperature_for_confidence(right, 0.99999, 0.5, 10.0) == 0.5  # out of reach: the bound
