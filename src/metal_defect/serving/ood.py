"""Out-of-distribution score: distance to the k-th nearest training image in feature space.

The features are the classifier's input (the penultimate layer), L2-normalised; the score
is the Euclidean distance to the k-th nearest of the training images' features (Sun et al.,
"Out-of-distribution detection with deep nearest neighbors", ICML 2022). Post-hoc: no
retraining, one matrix product per image. The threshold is a quantile of the validation
images' scores, so about (1 - quantile) of in-distribution images are flagged.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def knn_scores(features: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """Distance of each (normalised) feature row to its k-th nearest reference row."""
    if len(features) == 0:
        return np.zeros(0, dtype=np.float64)
    k = min(k, len(reference))
    similarity = normalise(features) @ reference.T
    kth = -np.partition(-similarity, k - 1, axis=1)[:, k - 1]
    return np.sqrt(np.maximum(2.0 - 2.0 * kth.astype(np.float64), 0.0))


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Probability that an outlier scores higher than an inlier (ties count half)."""
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(labels, np.r_[in_scores, out_scores]))


# ----------------------------------------------------------------------------- image statistics
STATISTICS = ("mean", "std", "skewness", "kurtosis", "gradient_x", "gradient_y", "laplacian", "dark_share", "bright_share")


def image_statistics(images: np.ndarray) -> np.ndarray:
    """A few numbers per image that describe how it looks, not what it shows: grey-level moments,
    edge energy along each axis, fine-detail energy, clipped shares; plus channel offsets for RGB.

    The network's features are trained to ignore much of this, which is why an inverted image or
    a photograph can land near a training image there; here they stand out.
    """
    x = np.asarray(images, dtype=np.float32) / 255.0
    grey = x.mean(axis=-1)
    n = len(grey)
    flat = grey.reshape(n, -1)
    mean, std = flat.mean(axis=1), flat.std(axis=1)
    centred = (flat - mean[:, None]) / np.maximum(std[:, None], 1e-3)
    gx = np.abs(np.diff(grey, axis=2)).reshape(n, -1).mean(axis=1)
    gy = np.abs(np.diff(grey, axis=1)).reshape(n, -1).mean(axis=1)
    lap = np.abs(grey[:, 1:-1, 1:-1] * 4 - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1] - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:]).reshape(n, -1).mean(axis=1)
    squared = centred * centred  # (x ** 3 with an integer power takes numpy's slow general path: 2 ms a picture)
    columns = [mean, std, (squared * centred).mean(axis=1), np.log1p((squared * squared).mean(axis=1)), gx, gy, lap,
               (flat < 0.02).mean(axis=1), (flat > 0.98).mean(axis=1)]
    if x.shape[-1] == 3:
        columns += [x[..., 0].reshape(n, -1).mean(axis=1) - x[..., 1].reshape(n, -1).mean(axis=1),
                    x[..., 2].reshape(n, -1).mean(axis=1) - x[..., 1].reshape(n, -1).mean(axis=1)]
    return np.stack(columns, axis=1).astype(np.float32)


@dataclass
class OodScorer:
    """Two k-NN distances, each divided by its own validation threshold; the score is the larger.

    A score above 1 means out of distribution. Features: L2-normalised penultimate features.
    Statistics: `image_statistics`, standardised by the training images' mean and spread.
    """

    features: np.ndarray  # [N, D] normalised training features
    statistics: np.ndarray  # [N, S] standardised training statistics
    stats_mean: np.ndarray
    stats_scale: np.ndarray
    neighbours: int
    feature_threshold: float = 1.0
    statistics_threshold: float = 1.0

    def components(self, features: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(feature distance, statistics distance) per image, before the thresholds."""
        return knn_scores(features, self.features, self.neighbours), self.statistics_distance(images)

    def statistics_distance(self, images: np.ndarray) -> np.ndarray:
        if len(images) == 0:
            return np.zeros(0)
        z = (image_statistics(images) - self.stats_mean) / self.stats_scale
        d2 = (z ** 2).sum(axis=1)[:, None] + (self.statistics ** 2).sum(axis=1)[None, :] - 2 * z @ self.statistics.T
        k = min(self.neighbours, len(self.statistics))
        return np.sqrt(np.maximum(np.partition(d2, k - 1, axis=1)[:, k - 1], 0.0)).astype(np.float64)

    def combine(self, feature_distance: np.ndarray, statistics_distance: np.ndarray) -> np.ndarray:
        """The OOD score from the two distances: the larger one over its threshold."""
        return np.maximum(feature_distance / self.feature_threshold, statistics_distance / self.statistics_threshold)

    def __call__(self, features: np.ndarray, images: np.ndarray) -> np.ndarray:
        return self.combine(*self.components(features, images))


def fit_scorer(train_features: np.ndarray, train_images: np.ndarray, neighbours: int) -> OodScorer:
    """The reference sets from the training images (thresholds left at 1: see `with_thresholds`)."""
    stats = image_statistics(train_images)
    mean = stats.mean(axis=0)
    scale = np.maximum(stats.std(axis=0), 1e-6)
    return OodScorer(normalise(train_features), ((stats - mean) / scale).astype(np.float32), mean.astype(np.float32),
                     scale.astype(np.float32), neighbours)


def benign_variants(images: np.ndarray) -> np.ndarray:
    """The same images after changes that keep them in distribution: JPEG at quality 75, and a 1.25x
    upscale and back (a second resampling's blur, as when a file was saved at another size)."""
    import io

    from PIL import Image

    out = []
    for array in images:
        image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=75)
        out.append(np.asarray(Image.open(buffer).convert(image.mode)))
        size = image.size
        larger = image.resize((round(size[0] * 1.25), round(size[1] * 1.25)), Image.Resampling.BILINEAR)
        out.append(np.asarray(larger.resize(size, Image.Resampling.BILINEAR)))
    stacked = np.stack(out) if out else np.zeros((0, *images.shape[1:]), np.uint8)
    return stacked[..., None] if stacked.ndim == 3 else stacked
