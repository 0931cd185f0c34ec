"""Honest numbers: classification metrics with intervals, calibration, temperature scaling.

Pure NumPy/scikit-learn functions on labels and probabilities; used by the evaluation
stage, `main.py evaluate DIR` and the benchmarks alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval for a proportion (sensible at 0 or n successes, unlike Wald)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def caption(n: int, errors: int) -> str:
    """'n=252, 2 errors, accuracy 99.2% (95% Wilson CI 97.2-99.8%)': stated on every figure."""
    lo, hi = wilson_interval(n - errors, n)
    acc = (n - errors) / n if n else 0.0
    return f"n={n}, {errors} error{'s' if errors != 1 else ''}, accuracy {acc:.1%} (95% Wilson CI {lo:.1%}–{hi:.1%})"


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy (with Wilson CI), macro and per-class precision/recall/F1, confusion matrix, log loss."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true = np.asarray(y_true, dtype=int)
    y_pred = probs.argmax(axis=1)
    labels = list(range(len(class_names)))
    n = len(y_true)
    correct = int((y_pred == y_true).sum())
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    macro = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    lo, hi = wilson_interval(correct, n)
    eps = 1e-12
    return {
        "n": n,
        "errors": n - correct,
        "accuracy": correct / n if n else 0.0,
        "accuracy_ci95": [lo, hi],
        "macro_precision": float(macro[0]),
        "macro_recall": float(macro[1]),
        "macro_f1": float(macro[2]),
        "log_loss": float(-np.mean(np.log(np.clip(probs[np.arange(n), y_true], eps, 1.0)))) if n else 0.0,
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalised": np.divide(cm, np.maximum(cm.sum(axis=1, keepdims=True), 1)).round(4).tolist(),
    }


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = 15) -> tuple[float, list[dict[str, float]]]:
    """Top-label ECE over equal-width confidence bins, and the per-bin table for the diagram."""
    y_true = np.asarray(y_true, dtype=int)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    table = []
    ece = 0.0
    for i in range(bins):
        lo, hi = edges[i], edges[i + 1]
        mask = (confidence > lo) & (confidence <= hi) if i else (confidence >= lo) & (confidence <= hi)
        count = int(mask.sum())
        if count:
            acc, conf = float(correct[mask].mean()), float(confidence[mask].mean())
            ece += count / len(y_true) * abs(acc - conf)
        else:
            acc = conf = float("nan")
        table.append({"lower": float(lo), "upper": float(hi), "count": count, "accuracy": acc, "confidence": conf})
    return float(ece), table


def bootstrap_ece(y_true: np.ndarray, probs: np.ndarray, bins: int, samples: int, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the ECE (resampling images with replacement)."""
    rng = np.random.default_rng(seed)
    n = len(y_true)
    values = []
    for _ in range(samples):
        idx = rng.integers(0, n, n)
        values.append(expected_calibration_error(y_true[idx], probs[idx], bins)[0])
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Macro-averaged F1 over `n_classes` classes (a class with no support and no prediction scores 0)."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    tp = np.diag(cm).astype(float)
    denom = cm.sum(axis=0) + cm.sum(axis=1)
    return float(np.mean(np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)))


def bootstrap_macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, samples: int, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the macro F1 (resampling images with replacement)."""
    if len(y_true) == 0:
        return (0.0, 1.0)
    return _bootstrap_interval(len(y_true), lambda idx: macro_f1(y_true[idx], y_pred[idx], n_classes), samples, seed)


def paired_bootstrap_difference(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, score: Callable[[np.ndarray, np.ndarray], float],
                                samples: int, seed: int = 0) -> tuple[float, float]:
    """95 % paired bootstrap interval of score(a) - score(b): both scored on the same resampled images.

    Two models tested on the same images are judged by the interval of their difference, not by
    whether their own intervals overlap: most of each interval's width is which images happened to
    be drawn, shared by both. Two intervals can overlap while one model is ahead on nearly every
    resample (a magnetic-tile model 0.199 ahead of a baseline, its interval overlapping by 0.017)."""
    y_true, pred_a, pred_b = (np.asarray(v) for v in (y_true, pred_a, pred_b))
    if len(y_true) == 0:
        return (-1.0, 1.0)
    return _bootstrap_interval(len(y_true), lambda idx: score(y_true[idx], pred_a[idx]) - score(y_true[idx], pred_b[idx]), samples, seed)


def _bootstrap_interval(n: int, statistic: Callable[[np.ndarray], float], samples: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of statistic(indices) over `samples` resamples of n items with replacement."""
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, n, n)) for _ in range(samples)]
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax(log p / T): T > 1 softens over-confident probabilities, T < 1 sharpens."""
    logits = np.log(np.clip(probs, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def negative_log_likelihood(y_true: np.ndarray, probs: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y_true)), np.asarray(y_true, dtype=int)], 1e-12, 1.0))))


def fit_temperature(y_true: np.ndarray, probs: np.ndarray, lower: float, upper: float) -> float:
    """The temperature in [lower, upper] that minimises the negative log-likelihood."""
    from scipy.optimize import minimize_scalar

    result = minimize_scalar(lambda log_t: negative_log_likelihood(y_true, apply_temperature(probs, math.exp(log_t))),
                             bounds=(math.log(lower), math.log(upper)), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(result.x))


def temperature_for_confidence(probs: np.ndarray, confidence: float, lower: float, upper: float) -> float:
    """The temperature in [lower, upper] at which the mean top probability of `probs` is `confidence` (a bound when
    none is: the mean top probability only falls as the temperature rises)."""
    from scipy.optimize import brentq

    def gap(t: float) -> float:
        return float(apply_temperature(probs, t).max(axis=1).mean()) - confidence

    if gap(lower) <= 0:
        return lower
    if gap(upper) >= 0:
        return upper
    return float(brentq(gap, lower, upper, xtol=1e-4))


def present_macro_f1(result: dict[str, Any]) -> float:
    """Macro F1 over the classes the set holds or the model answered (as sklearn does without `labels`): a class
    absent from both would count as 0 and pull a small slice's score down for nothing."""
    matrix = np.asarray(result["confusion_matrix"], dtype=float)
    true, answered, hits = matrix.sum(axis=1), matrix.sum(axis=0), np.diag(matrix)
    present = (true + answered) > 0
    f1 = np.divide(2 * hits, true + answered, out=np.zeros_like(hits), where=(true + answered) > 0)
    return float(f1[present].mean()) if present.any() else 0.0
