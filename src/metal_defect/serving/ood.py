"""Out-of-distribution score: distance to the k-th nearest training image in feature space.

The features are the classifier's input (the penultimate layer), L2-normalised; the score
is the Euclidean distance to the k-th nearest of the training images' features (Sun et al.,
"Out-of-distribution detection with deep nearest neighbors", ICML 2022). Post-hoc: no
retraining, one matrix product per image. The threshold is a quantile of the validation
images' scores, so about (1 - quantile) of in-distribution images are flagged.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def neighbours_for(reference_count: int) -> int:
    """k for `ood_neighbours: auto`: 0.1 % of the reference images, at least 1 (the ratio of Sun et al.'s
    k=50 for CIFAR-10's 50,000 and k=1000 for ImageNet's 1.28 M training images)."""
    return max(1, round(reference_count / 1000))


def feature_layer(model: Any) -> str:
    """Name of the layer whose output feeds the final classifier (dropout layers skipped)."""
    import keras

    classifier = model.layers[-1]
    if not isinstance(classifier, keras.layers.Dense):
        raise ValueError(f"{model.name}: the last layer is {type(classifier).__name__}, not the Dense classifier")
    layer = _producer(classifier)
    while isinstance(layer, keras.layers.Dropout):
        layer = _producer(layer)
    return layer.name


def _producer(layer: Any) -> Any:
    return layer._inbound_nodes[0].parent_nodes[0].operation


def with_features(model: Any, layer_name: str) -> Any:
    """The same network returning (probabilities, penultimate features)."""
    import keras

    return keras.Model(model.inputs, [model.outputs[0], model.get_layer(layer_name).output], name=f"{model.name}_serving")


def normalise(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def knn_scores(features: np.ndarray, reference: np.ndarray, k: int, exclude_self: bool = False) -> np.ndarray:
    """Distance of each (normalised) feature row to its k-th nearest reference row."""
    if len(features) == 0:
        return np.zeros(0, dtype=np.float64)
    k = min(k + int(exclude_self), len(reference))
    similarity = normalise(features) @ reference.T
    kth = -np.partition(-similarity, k - 1, axis=1)[:, k - 1]
    return np.sqrt(np.maximum(2.0 - 2.0 * kth.astype(np.float64), 0.0))


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Probability that an outlier scores higher than an inlier (ties count half)."""
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(labels, np.r_[in_scores, out_scores]))
